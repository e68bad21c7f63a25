"""Mini-BERT: L3/H192/A4/I768 with an 8K WordPiece vocabulary, sequences of 128, a global batch of
32 reached as 4 accumulated micro-batches of 8; fits in a few GB on a CPU.

  python -m mlm_jax.main --config=configs/mini_bert.py --workdir=runs/mini_bert
  python -m mlm_jax.main --config=configs/mini_bert.py --workdir=runs/mini_wiki \
      --config.data.train_files=../shared/data/wikitext-2-raw/wiki.valid.raw \
      --config.data.eval_files= --config.data.eval_fraction=0.05

Default data: the shipped Shakespeare slice, read lazily (records are read by offset, a chunk at a
time: the corpus never sits in memory, so any size streams). The vocabulary
(mlm_jax/assets/shakespeare/vocab_8k.txt) was trained on the full tiny-shakespeare text; for another
corpus train one with tools/train_tokenizer.py --vocab_size=8192 and set data.vocab_path.
"""
from mlm_jax.config import base_config


def get_config(variant: str = ''):
  if variant:
    raise ValueError(f'unknown variant {variant!r} (there are none)')
  c = base_config()
  c.model.update(num_layers=3, hidden_size=192, num_heads=4, intermediate_size=768,
                 vocab_size=8192, max_len=128, dropout=0.1, layer_norm='post')
  c.data.update(vocab_path='{assets}/shakespeare/vocab_8k.txt', text_unit='block', packing=True,
                num_workers=0, prefetch_chunks=2)
  c.optimizer.update(learning_rate=5e-4, warmup_steps=200, schedule='linear', weight_decay=0.01)
  # 32 sequences per optimizer step = 4 micro-batches of 8 (gradients summed in one jitted step).
  c.train.update(steps=3_000, batch_size=32, grad_accum_steps=4, log_every=50, eval_every=500,
                 eval_steps=-1)
  c.checkpoint.update(every=500, keep=2)
  return c
