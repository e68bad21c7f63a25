"""tools/prepare_corpus.py -> TFDS array_record dataset -> the same pipeline (source='tfds')."""
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from mlm_jax import data
from mlm_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prepare(tmp, *args):
  cmd = [sys.executable, os.path.join(REPO, 'tools', 'prepare_corpus.py'), f'--data_dir={tmp}',
         f'--cache_dir={tmp}/cache', *args]
  subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)


def make_config(tmp, name, **overrides):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict(
      {'max_len': 64, 'vocab_size': 2048, 'extra_embeddings': ml_collections.ConfigDict()})
  c.train = ml_collections.ConfigDict({'batch_size': 8, 'grad_accum_steps': 1})
  c.data = data.defaults()
  c.data.update(source='tfds', tfds_name=name, tfds_data_dir=str(tmp), **overrides)
  return c


@pytest.fixture(scope='module')
def datasets(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('tfds')
  prepare(tmp, '--files={assets}/shakespeare/valid.txt', '--text_unit=block', '--name=shakes_ids',
          '--tokenizer=wordpiece', '--vocab_path={assets}/shakespeare/vocab.txt',
          '--eval_fraction=0.2')
  rows = [{'text': f'host{i}.example', 'tld': i % 3, 'kind': [i % 2] * len(f'host{i}.example')}
          for i in range(200)]
  (tmp / 'r.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  prepare(tmp, f'--files={tmp}/r.jsonl', '--format=jsonl', '--features=tld,kind', '--name=hosts')
  return tmp


def test_pretokenized_dataset_trains_and_evaluates(datasets):
  c = make_config(datasets, 'shakes_ids')
  tok = data.build_tokenizer(c)
  it = data.train_iterator(c, tok)
  a = [next(it) for _ in range(3)]
  b = data.train_iterator(c, tok)
  for x in a:
    y = next(b)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert a[0]['mlm_weights'].sum() > 0 and a[0]['input_ids'].shape == (8, 64)
  ev = list(data.eval_batches(c, tok))
  assert ev and all(e['input_ids'].shape == (8, 64) for e in ev)


def test_pretokenized_dataset_refuses_another_tokenizer(datasets):
  c = make_config(datasets, 'shakes_ids', lowercase=False)
  with pytest.raises(ConfigError, match='data.tokenizer'):
    data.train_iterator(c, data.build_tokenizer(c))


def test_jsonl_features_survive_the_round_trip(datasets):
  c = make_config(datasets, 'hosts', tokenizer='char')
  c.model.vocab_size = data.CharTokenizer(c.data.alphabet).vocab_size
  c.model.extra_embeddings = ml_collections.ConfigDict({'tld': 3, 'kind': 2})
  tok = data.build_tokenizer(c)
  batch = next(data.train_iterator(c, tok))
  seg = batch['segment_ids']
  assert (batch['tld'][seg == 0] == 0).all()
  for r in range(len(seg)):
    for s in range(1, seg[r].max() + 1):
      assert len(set(batch['tld'][r][seg[r] == s])) == 1
      kinds = batch['kind'][r][seg[r] == s][1:-1]
      assert len(set(kinds)) == 1  # each record's per-token list is constant here
