"""Quick start: a tiny BERT on the shipped Shakespeare slice; trains in a few minutes on a laptop CPU.

  python -m mlm_jax.main --config=configs/quickstart.py --workdir=runs/quickstart
"""
from mlm_jax.config import base_config


def get_config():
  c = base_config()
  c.seed = 0
  # 2 x 128 BERT with the shipped 2,048-piece WordPiece vocabulary (about 0.7M parameters).
  c.model.update(num_layers=2, hidden_size=128, num_heads=2, intermediate_size=512,
                 vocab_size=2048, max_len=64, dropout=0.1)
  # Data defaults already point at the shipped corpus: {assets}/shakespeare/{train,valid}.txt.
  c.data.update(text_unit='block', packing=True)
  c.optimizer.update(learning_rate=2e-3, warmup_steps=30, schedule='cosine', end_lr_ratio=0.1)
  c.train.update(steps=400, batch_size=32, log_every=20, eval_every=100, eval_steps=-1)
  c.checkpoint.update(every=100, keep=2)
  return c
