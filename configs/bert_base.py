"""BERT-base (L12/H768/A12, ~110M parameters with a 30,522-piece vocabulary) on text files.

  python -m mlm_jax.main --config=configs/bert_base.py --workdir=runs/bert_base \
      --config.data.train_files='corpus/*.txt' --config.data.vocab_path=path/to/vocab.txt

Point `data.vocab_path` at a BERT vocab.txt (e.g. bert-base-uncased's, or one made with
tools/train_tokenizer.py) and set `model.vocab_size` to its size if it is not 30,522.

Phase 2 (BERT's last 10% of steps at length 512, to learn the long positions) is a new run that
starts from phase 1's parameters with a fresh optimizer:

  python -m mlm_jax.main --config=configs/bert_base.py:seq512 --workdir=runs/bert_base_512 \
      --config.train.init_from=runs/bert_base --config.data.train_files='corpus/*.txt' \
      --config.data.vocab_path=path/to/vocab.txt

The position table grows from 128 to 512 rows, interpolated from the trained ones (README
"Continued pretraining"). The same command with `train.init_from=path/to/bert-base-uncased`
(an HF directory: config.json, model.safetensors, vocab.txt) continues a published BERT on your
corpus (domain-adaptive pretraining); use the default variant for length 128.
"""
from mlm_jax.config import base_config


def get_config(variant: str = ''):
  c = base_config()
  c.model.update(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072,
                 vocab_size=30522, max_len=128, dropout=0.1, layer_norm='post')
  c.data.update(text_unit='line', packing=True, vocab_path='', eval_files='', eval_fraction=0.005,
                num_workers=2)
  c.optimizer.update(learning_rate=1e-4, warmup_steps=10_000, schedule='linear',
                     weight_decay=0.01, b2=0.999, eps=1e-6, clip_norm=1.0)
  # BERT's phase 1: 256 x 128 tokens for 900k steps (here 1M with a linear decay).
  c.train.update(steps=1_000_000, batch_size=256, log_every=100, eval_every=10_000, eval_steps=50)
  c.checkpoint.update(every=5_000, keep=3)
  if variant == 'seq512':
    c.model.max_len = 512
    # Phase 2: 10% of phase 1's steps, the same tokens per step (64 x 512 = 256 x 128); a fresh
    # Adam needs its warmup again (its moments start at zero).
    c.train.update(batch_size=64, steps=100_000)
    c.optimizer.warmup_steps = 10_000
  elif variant:
    raise ValueError(f'unknown variant {variant!r} (known: seq512)')
  return c
