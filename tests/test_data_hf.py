"""data.source='hf': Hugging Face `datasets` read by index (save_to_disk, load_dataset on local
files) and streamed; every dataset is built here, nothing is downloaded."""
import json
import os
import subprocess
import sys

os.environ.setdefault('HF_DATASETS_OFFLINE', '1')  # before `datasets` reads it

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests.conftest import need  # noqa: E402
from mlm_jax import data  # noqa: E402
from mlm_jax.config import base_config  # noqa: E402
from mlm_jax.data import config as data_config  # noqa: E402
from mlm_jax.data import hf_source, pipeline  # noqa: E402
from mlm_jax.errors import ConfigError, DataError  # noqa: E402

datasets = need('datasets')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The pipeline's hook for streamed sources (split_records -> HfStreams.split, a shard order of
# their own, eval in blocks).
HAS_STREAM_HOOK = hasattr(pipeline._Epochs, 'epoch_records')  # pylint: disable=protected-access
needs_stream_hook = pytest.mark.skipif(not HAS_STREAM_HOOK, reason='pipeline.py lacks the hook '
                                       'for streamed sources')


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
  """No network, and load_dataset's Arrow cache in the test's own directory."""
  monkeypatch.setattr(datasets.config, 'HF_HUB_OFFLINE', True)
  monkeypatch.setattr(datasets.config, 'HF_DATASETS_CACHE', str(tmp_path / 'hf_cache'))


def shakespeare(n):
  """The first n blocks of the shipped corpus (records with real WordPiece text)."""
  path = os.path.join(data_config.ASSETS_DIR, 'shakespeare', 'train.txt')
  with open(path, encoding='utf-8') as f:
    blocks = [b.strip() for b in f.read().split('\n\n') if b.strip()]
  return blocks[:n]


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """300 records with a per-record 'tld' id: saved by save_to_disk, and the same as JSONL."""
  tmp = tmp_path_factory.mktemp('hf')
  texts = shakespeare(300)
  rows = {'text': texts, 'tld': [i % 7 for i in range(len(texts))]}
  datasets.Dataset.from_dict(rows).save_to_disk(str(tmp / 'saved'))
  with open(tmp / 'records.jsonl', 'w', encoding='utf-8') as f:
    for t, tld in zip(rows['text'], rows['tld']):
      f.write(json.dumps({'text': t, 'tld': tld}) + '\n')
  return tmp


def make_config(**overrides):
  c = base_config()
  c.model.update(max_len=64, vocab_size=2048)
  c.train.batch_size = 8
  c.data.update(source='hf', eval_files='', chunk_records=64)
  c.data.update(overrides)
  return c


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_saved_dataset_gives_the_batches_of_the_same_records_as_jsonl(corpus, tmp_path):
  """Record order, splits and masks are pure functions of (seed, record index, content): a
  Dataset holding the records of a JSONL file must give exactly that file's batches."""
  extra = ml_collections.ConfigDict({'tld': 7})
  hf = make_config(hf_path=str(corpus / 'saved'))
  js = make_config(source='jsonl', train_files=str(corpus / 'records.jsonl'),
                   cache_dir=str(tmp_path / 'index'))
  hf.model.extra_embeddings = js.model.extra_embeddings = extra
  tok = data.build_tokenizer(hf)
  a, b = take(data.train_iterator(hf, tok), 12), take(data.train_iterator(js, tok), 12)
  assert_same(a, b)
  assert 'tld' in a[0] and a[0]['mlm_weights'].sum() > 0
  assert_same(list(data.eval_batches(hf, tok)), list(data.eval_batches(js, tok)))
  _, train = data.split_records(hf, 'train')
  _, ev = data.split_records(hf, 'eval')
  assert not set(train.tolist()) & set(ev.tolist()) and len(train) + len(ev) == 300
  assert 0 < len(ev) < 40  # data.eval_fraction = 0.05 of 300, by hash


def test_worker_count_and_resume_do_not_change_the_batches(corpus):
  c = make_config(hf_path=str(corpus / 'saved'))
  tok = data.build_tokenizer(c)
  ref = take(data.train_iterator(c, tok), 30)  # 30 x 8 rows: past the first epoch
  it = data.train_iterator(c, tok)
  take(it, 17)
  state = it.get_state()
  again = data.train_iterator(c, tok)
  again.set_state(state)
  assert_same(take(again, 13), ref[17:])
  c.data.num_workers = 2
  workers = data.train_iterator(c, tok)
  try:
    assert_same(take(workers, 30), ref)
  finally:
    workers.close()


def test_extra_embedding_column_reaches_every_token_of_its_record(tmp_path):
  """Records of one letter each, tld = which letter: every token of a packed record carries its
  own record's id, [CLS]/[SEP] too, and padding 0; per-token lists land token by token."""
  letters = 'abcdefg'
  texts = [letters[i % 7] * (3 + i % 5) for i in range(120)]
  rows = {'text': texts, 'tld': [1 + i % 7 for i in range(120)],
          'pos': [[j % 2 for j in range(len(t))] for t in texts]}
  datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / 'd'))
  c = make_config(hf_path=str(tmp_path / 'd'), tokenizer='char', mask_rate=0.01,
                  mask_token_frac=0.0, random_token_frac=0.0)  # chosen tokens stay as they were
  tok = data.CharTokenizer(c.data.alphabet)
  c.model.vocab_size = tok.vocab_size
  c.model.extra_embeddings = ml_collections.ConfigDict({'tld': 8, 'pos': 2})
  batch = next(data.train_iterator(c, data.build_tokenizer(c)))
  ids, seg, tld, pos = batch['input_ids'], batch['segment_ids'], batch['tld'], batch['pos']
  assert (tld[seg == 0] == 0).all() and (seg > 0).sum() > 100
  checked = 0
  for r in range(len(ids)):
    for s in range(1, seg[r].max() + 1):
      cols = np.flatnonzero(seg[r] == s)
      chars = {tok.decode([i]) for i in ids[r][cols[1:-1]]}
      assert len(chars) == 1, chars
      assert (tld[r][cols] == 1 + letters.index(chars.pop())).all()
      np.testing.assert_array_equal(pos[r][cols[1:-1]], np.arange(len(cols) - 2) % 2)
      assert pos[r][cols[0]] == pos[r][cols[-1]] == 0
      checked += 1
  assert checked > 10


def test_eval_split_of_a_dataset_dict(tmp_path):
  """hf_eval_split reads the DatasetDict's own split; '' carves eval out of the train split."""
  train = [f'the king is dead {i}' for i in range(50)] + [f'long live the king {i}'
                                                          for i in range(50)]
  valid = ['o romeo romeo'] * 30
  datasets.DatasetDict({'train': datasets.Dataset.from_dict({'text': train}),
                        'validation': datasets.Dataset.from_dict({'text': valid})}
                       ).save_to_disk(str(tmp_path / 'dd'))
  c = make_config(hf_path=str(tmp_path / 'dd'), hf_eval_split='validation', mask_rate=0.5)
  tok = data.build_tokenizer(c)
  romeo = set(tok.encode_batch(['o romeo romeo'])[0].tolist())
  kings = set(np.concatenate(tok.encode_batch(train)).tolist())
  ev = list(data.eval_batches(c, tok))
  targets = set(np.concatenate([b['mlm_targets'][b['mlm_weights'] > 0] for b in ev]).tolist())
  assert targets and targets <= romeo
  src, ids = data.split_records(c, 'eval')
  assert len(ids) == 30 and src.name.endswith('[validation]')
  batch = next(data.train_iterator(c, tok))
  assert set(batch['mlm_targets'][batch['mlm_weights'] > 0].tolist()) <= kings
  c.data.update(hf_eval_split='', eval_fraction=0.3)  # carved out of train by hash
  src, ev = data.split_records(c, 'eval')
  _, tr = data.split_records(c, 'train')
  assert src.name.endswith('[train]') and 10 < len(ev) < 50
  assert sorted(ev.tolist() + tr.tolist()) == list(range(100))
  c.data.hf_eval_split = 'test'
  with pytest.raises(ConfigError, match=r"data.hf_eval_split.*'test' is not a split"):
    data.split_records(c, 'eval')


def test_load_dataset_on_local_json_files_equals_the_saved_dataset(corpus, tmp_path):
  c = make_config(hf_path='json', hf_data_files=str(corpus / 'records.jsonl'))
  saved = make_config(hf_path=str(corpus / 'saved'))
  tok = data.build_tokenizer(c)
  assert_same(take(data.train_iterator(c, tok), 5), take(data.train_iterator(saved, tok), 5))
  assert os.listdir(tmp_path / 'hf_cache')  # converted once into the (test's) Arrow cache
  c.data.hf_split = 'train[:50%]'
  src, ids = data.split_records(c, 'train')
  assert len(src) == 150


def write_jsonl(path, objects):
  path.write_text(''.join(json.dumps(o) + '\n' for o in objects))
  return str(path)


def test_a_record_without_text_is_a_counted_bad_record(tmp_path, caplog):
  objects = [{'text': f'record {i}'} for i in range(40)]
  objects[7] = {'note': 'no text here'}  # null in the Arrow column: a missing field
  objects[30] = {'text': None}
  c = make_config(hf_path='json', hf_data_files=write_jsonl(tmp_path / 'r.jsonl', objects),
                  tokenizer='char', eval_fraction=0.0, max_bad_fraction=1.0, chunk_records=40)
  c.model.vocab_size = data.CharTokenizer(c.data.alphabet).vocab_size
  tok = data.build_tokenizer(c)
  it = data.train_iterator(c, tok)
  next(it)
  counts = it.stats.as_dict()
  assert counts['records'] in (40, 80) and counts['bad_records'] == counts['records'] // 20  # 2/epoch
  assert "record 7: no 'text' field" in caplog.text and "record 30: no 'text'" in caplog.text
  c.data.bad_records = 'error'
  with pytest.raises(DataError, match=r"record (7|30): no 'text' field"):
    next(data.train_iterator(c, tok))


def test_config_errors_name_the_field(corpus, monkeypatch):
  c = make_config(hf_path=str(corpus / 'saved'), text_field='body')
  with pytest.raises(ConfigError, match="data.text_field.*no column 'body'.*text, tld"):
    data.split_records(c, 'train')
  c = make_config(hf_path=str(corpus / 'saved'))
  c.model.extra_embeddings = ml_collections.ConfigDict({'event': 3})
  with pytest.raises(ConfigError, match="model.extra_embeddings.*no column 'event'"):
    data.split_records(c, 'train')
  c = make_config(hf_path=str(corpus / 'saved'), hf_split='validation')
  with pytest.raises(ConfigError, match='data.hf_split.*one Dataset'):
    data.split_records(c, 'train')
  c = make_config(hf_path=str(corpus / 'saved'), split_key='domain')
  with pytest.raises(ConfigError, match="data.split_key.*no column 'domain'"):
    data.split_records(c, 'eval')
  with pytest.raises(ConfigError, match='data.hf_path'):
    data.validate(make_config())
  with pytest.raises(DataError, match='data.hf_path.*cannot load'):
    data.split_records(make_config(hf_path=str(corpus / 'no_such_dir')), 'train')
  with pytest.raises(ConfigError, match='data.stratify_field'):
    data.validate(make_config(hf_path='x', hf_streaming=True, stratify_field='tld'))


def test_without_the_datasets_package_the_error_says_how_to_install_it(monkeypatch):
  import importlib.util  # pylint: disable=import-outside-toplevel
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'datasets' else real(name, *a))
  with pytest.raises(ConfigError, match=r"data.source.*pip install 'mlm_jax\[hf_data\]'"):
    data.validate(make_config(hf_path='x'))
  monkeypatch.setitem(sys.modules, 'datasets', None)  # import datasets -> ImportError
  with pytest.raises(ConfigError, match=r'data.source.*pip install'):
    hf_source.import_datasets()


# Streamed datasets.

def stream(path, which='train', **overrides):
  return hf_source.HfStreams(make_config(hf_path=str(path), hf_streaming=True,
                                         **overrides)).split(which)


def texts_at(s, shard, shards, start, n):
  ids = hf_source.encode_ids(np.arange(start, start + n), shard, shards)
  return s.read(ids, {}).texts


def test_a_stream_reads_each_record_once_per_epoch_in_a_seeded_file_order(corpus):
  texts = shakespeare(300)
  s = stream(corpus / 'saved', eval_fraction=0.0)
  assert s.files == 64  # a saved dataset streams as 64 row ranges
  epoch0, epoch1 = texts_at(s, 0, 1, 0, 300), texts_at(s, 0, 1, 300, 300)
  assert sorted(epoch0) == sorted(texts) == sorted(epoch1) and epoch0 != epoch1
  assert epoch0 != texts  # the files come in a seeded order ...
  first = texts.index(epoch0[0])
  assert epoch0[:3] == texts[first:first + 3]  # ... each one's records in order
  fresh = stream(corpus / 'saved', eval_fraction=0.0)  # a new reader jumps anywhere, exactly
  assert texts_at(fresh, 0, 1, 450, 20) == epoch1[150:170]
  assert texts_at(fresh, 0, 1, 10, 5) == epoch0[10:15]  # and back
  # Input shards own whole files, between them every record once per epoch.
  parts = [texts_at(stream(corpus / 'saved', eval_fraction=0.0), k, 4, 0, 75) for k in range(4)]
  assert sorted(sum(parts, [])) == sorted(texts)


def test_a_stream_with_fewer_files_than_input_shards_strides_over_the_records(corpus):
  s = stream('json', hf_data_files=str(corpus / 'records.jsonl'), eval_fraction=0.0)
  assert s.files == 1
  texts = shakespeare(300)
  assert texts_at(s, 1, 3, 0, 100) == texts[1::3]
  assert texts_at(s, 2, 3, 100, 100) == texts[2::3]  # the next pass, same single-file order


def test_a_streamed_bad_record_is_counted_and_named_by_shard_and_row(tmp_path):
  objects = [{'text': f'record {i}'} for i in range(40)]
  objects[7] = {'note': 'no text here'}
  path = write_jsonl(tmp_path / 'r.jsonl', objects)
  s = stream('json', hf_data_files=path, eval_fraction=0.0)
  ids = hf_source.encode_ids(np.arange(40, 80), 0, 1)  # the second pass
  records = s.read(ids, {})
  assert records.bad == [(7, "no 'text' field (data.text_field)")]
  assert records.texts == [o['text'] for o in objects if 'text' in o]
  assert s.where(int(ids[7])) == 'hf:json[train] shard 0 row 7 (epoch 1)'
  limited = stream('json', hf_data_files=path, eval_fraction=0.0, max_records=10)
  assert texts_at(limited, 0, 1, 0, 20) == [f'record {i}' for i in range(7)] + [
      'record 8', 'record 9'] + [f'record {i}' for i in range(7)] + ['record 8', 'record 9']


def test_a_stream_is_carved_like_the_same_dataset_by_index(corpus):
  c = make_config(hf_path=str(corpus / 'saved'), test_fraction=0.1)
  by_index = {}
  for which in ('train', 'eval', 'test'):
    src, ids = data.split_records(c, which)
    by_index[which] = sorted(r['text'] for r in src._ds.__getitems__(ids.tolist()))  # pylint: disable=protected-access
  for which, endless in (('train', True), ('eval', False), ('test', False)):
    s = stream(corpus / 'saved', which, test_fraction=0.1)
    n = len(by_index[which])
    assert sorted(texts_at(s, 0, 1, 0, n)) == by_index[which]
    if not endless:
      assert len(list(s.blocks(1000))) == 1 and len(s.read(next(s.blocks(1000)), {}).texts) == n


@needs_stream_hook
def test_streamed_training_is_exact_across_workers_and_resume(corpus):
  c = make_config(hf_path=str(corpus / 'saved'), hf_streaming=True)
  c.model.extra_embeddings = ml_collections.ConfigDict({'tld': 7})
  tok = data.build_tokenizer(c)
  ref = take(data.train_iterator(c, tok), 30)
  assert ref[0]['mlm_weights'].sum() > 0 and ref[0]['tld'].max() > 0
  it = data.train_iterator(c, tok)
  take(it, 19)
  again = data.train_iterator(c, tok)
  again.set_state(it.get_state())
  assert_same(take(again, 11), ref[19:])
  c.data.num_workers = 2
  workers = data.train_iterator(c, tok)
  try:
    assert_same(take(workers, 30), ref)
  finally:
    workers.close()
  ev = list(data.eval_batches(c, tok))
  assert ev and all(b['input_ids'].shape == (8, 64) for b in ev)
  c.data.update(hf_path='json', hf_data_files=str(corpus / 'records.jsonl'), num_shards=2)
  two = data.train_iterator(c, tok)  # one file, two input shards: strided, still trains
  assert next(two)['mlm_weights'].sum() > 0


@pytest.mark.parametrize('streaming', [False, True])
def test_cli_trains_on_a_saved_dataset(corpus, tmp_path, streaming):
  if streaming and not HAS_STREAM_HOOK:
    pytest.skip('pipeline.py lacks the hook for streamed sources')
  env = dict(os.environ, JAX_PLATFORMS='cpu', MLM_JAX_NO_LAUNCH='1', HF_DATASETS_OFFLINE='1',
             HF_DATASETS_CACHE=str(tmp_path / 'hf_cache'),
             XLA_FLAGS='--xla_force_host_platform_device_count=1')
  cmd = [sys.executable, '-m', 'mlm_jax.main', '--config=configs/quickstart.py',
         f'--workdir={tmp_path / "run"}', '--config.data.source=hf',
         f'--config.data.hf_path={corpus / "saved"}', f'--config.data.hf_streaming={streaming}',
         '--config.train.steps=3', '--config.train.eval_every=0', '--config.train.log_every=1',
         '--config.train.progress_bar=False', '--config.train.compilation_cache_dir=']
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / 'run' / 'metrics.jsonl', encoding='utf-8') as f:
    steps = [json.loads(line)['step'] for line in f if 'train/loss' in line]
  assert steps[-1] == 3
