"""BERT-large (L24/H1024/A16, ~335M parameters) on text files; pre-LN and scanned layers by default
for stable training and fast compilation at depth; remat saves activation memory.

  python -m mlm_jax.main --config=configs/bert_large.py --workdir=runs/bert_large \
      --config.data.train_files='corpus/*.txt' --config.data.vocab_path=path/to/vocab.txt
"""
import importlib.util
import os


def _bert_base():
  # Loaded by path: config files are loaded by path too, from any working directory.
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bert_base.py')
  spec = importlib.util.spec_from_file_location('bert_base_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(variant: str = ''):
  c = _bert_base().get_config(variant)
  c.model.update(num_layers=24, hidden_size=1024, num_heads=16, intermediate_size=4096,
                 layer_norm='pre', scan_layers=True, remat_policy='save_dots')
  c.optimizer.learning_rate = 5e-5
  return c
