"""ModernBERT-base (L22/H768/A12, GeGLU intermediate 1152; transformers' ModernBertForMaskedLM) on
text files, sequences of 1024 packed, 30% masking.

  python -m mlm_jax.main --config=configs/modernbert_base.py --workdir=runs/modernbert_base \
      --config.data.train_files='corpus/*.txt' --config.data.vocab_path=path/to/vocab.txt
  python -m mlm_jax.main --config=configs/modernbert_base.py:tiny --workdir=runs/modernbert_tiny
  python tools/export_hf.py runs/modernbert_tiny runs/modernbert_tiny_hf   # ModernBertForMaskedLM

The architecture is ModernBERT's (model.arch='modernbert', mlm_jax/modernbert.py): rotary
embeddings (theta 160,000 on the global layers, 10,000 on the local ones), bias-free pre-LN blocks,
global attention on every third layer and a ±64-token window on the others, GeGLU, dropout 0,
LayerNorm eps 1e-5. The tokenizer is BERT-base's setup (a WordPiece vocab.txt of 30,522 pieces,
bring your own as for configs/bert_base.py), not ModernBERT's BPE, so the exported model loads with
a BertTokenizer. Recipe (ModernBERT paper, Warner et al. 2024; docs/recipes.md): 30% masking,
StableAdamW (AdamW b2=0.98 with per-tensor update clipping), peak learning rate 8e-4 on a
warmup-stable-decay schedule with a 1-sqrt decay, weight decay 1e-5 fully decoupled (optax scales
it by the learning rate: 1e-5 / 8e-4 = 0.0125 here).

Variants:
- ':tiny': L4/H64/A4 (global layers 0 and 3, local 1 and 2, a ±16 window over 128 tokens) on the
  shipped Shakespeare slice and vocabulary; trains on a CPU in seconds.
- ':mini': the Mini-BERT shape (L3/H192/A4, GeGLU 512 = Mini-BERT's feed-forward parameters, 8K
  WordPiece, sequences of 128, 32 per step) with this recipe at a peak learning rate of 2e-3, as
  tools/race.py runs it.
"""
from mlm_jax.config import base_config


def get_config(variant: str = ''):
  if variant not in ('', 'tiny', 'mini'):
    raise ValueError(f'unknown variant {variant!r} (known: tiny, mini)')
  c = base_config()
  c.model.update(arch='modernbert', num_layers=22, hidden_size=768, num_heads=12,
                 intermediate_size=1152, vocab_size=30522, max_len=1024, layer_norm='pre',
                 layer_norm_eps=1e-5, dropout=0.0, attention_dropout=0.0, init_std=0.02,
                 local_attention=128, global_attn_every_n_layers=3, global_rope_theta=160000.0,
                 local_rope_theta=10000.0, scan_layers=True, dtype='auto')
  c.data.update(text_unit='line', packing=True, vocab_path='', eval_files='', eval_fraction=0.005,
                num_workers=2, mask_rate=0.3)
  # Warmup, then the peak held, then a 1-sqrt decay over the last 10% (docs/recipes.md); StableAdamW's
  # per-tensor update clipping instead of global-norm gradient clipping.
  c.optimizer.update(learning_rate=8e-4, warmup_steps=3_000, schedule='wsd', wsd_decay_fraction=0.1,
                     end_lr_ratio=0.0, weight_decay=0.0125, b1=0.9, b2=0.98, eps=1e-6,
                     clip_norm=0.0, update_clipping=True)
  # 256 x 1024 tokens per step (8x BERT-base's 256 x 128).
  c.train.update(steps=200_000, batch_size=256, log_every=100, eval_every=5_000, eval_steps=50)
  c.checkpoint.update(every=2_500, keep=3)
  if variant == 'tiny':
    c.model.update(num_layers=4, hidden_size=64, num_heads=4, intermediate_size=96,
                   vocab_size=2048, max_len=128, local_attention=32, scan_layers=False,
                   dtype='float32')
    c.data.update(vocab_path='{assets}/shakespeare/vocab.txt', train_files=
                  '{assets}/shakespeare/train.txt', eval_files='{assets}/shakespeare/valid.txt',
                  text_unit='block', num_workers=0)
    c.optimizer.update(learning_rate=3e-3, warmup_steps=10)
    c.train.update(steps=60, batch_size=16, log_every=10, eval_every=30, eval_steps=4)
    c.checkpoint.update(every=30, keep=2)
  elif variant == 'mini':
    # GeGLU's Wi is 2 x intermediate wide: 512 gives Mini-BERT's feed-forward parameters (768 x 2).
    c.model.update(num_layers=3, hidden_size=192, num_heads=4, intermediate_size=512,
                   vocab_size=8192, max_len=128, scan_layers=False)
    c.data.update(vocab_path='{assets}/shakespeare/vocab_8k.txt', train_files=
                  '{assets}/shakespeare/train.txt', eval_files='{assets}/shakespeare/valid.txt',
                  text_unit='block', num_workers=0, prefetch_chunks=2)
    # A small model takes a larger peak learning rate than the base's 8e-4.
    c.optimizer.update(learning_rate=2e-3, warmup_steps=200)
    c.train.update(steps=3_000, batch_size=32, log_every=50, eval_every=500, eval_steps=-1)
    c.checkpoint.update(every=500, keep=2)
  return c
