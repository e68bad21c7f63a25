"""gs:// for real: a local GCS emulator (the gcp-storage-emulator package) on 127.0.0.1 serves a
bucket; the run directory and its input data live there; gcsfs (epath), tensorstore (orbax's
arrays) and google-cloud-cpp (array_record, TFDS) are pointed at it (mlm_jax/gcs_emulator.py).

A CLI run on gs:// is SIGKILLed mid-run and resumed: same per-step losses and final digest as the
same run on local disk; then evaluate, predict, export_hf, import_hf and plot_metrics read and write
the bucket and agree with the local run.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from etils import epath

from tests.conftest import need

need('gcp_storage_emulator')  # skips the module where the emulator (mlm_jax[test]) is missing
need('gcsfs')

from mlm_jax import checkpoint as ckpt  # noqa: E402
from mlm_jax import data, evaluate, gcs_emulator, metrics, paths, predict, train  # noqa: E402
from mlm_jax.data import domains, registry, sources, textindex  # noqa: E402
from tests.test_resume import STEPS, tiny  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = 'mlmjax-test'
ASSETS = os.path.join(REPO, 'mlm_jax', 'assets', 'shakespeare')
TEXTS = ['the king [MASK] to the tower , my lord .', 'o [MASK] , [MASK] !']


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  """The emulator, with this process's clients pointed at it (subprocesses inherit os.environ)."""
  log = tmp_path_factory.mktemp('emulator') / 'emulator.log'
  with gcs_emulator.running(BUCKET, log_path=str(log)) as emulator:
    with gcs_emulator.activated(emulator.env):
      yield emulator


def upload(local_dir, url):
  """Copies a local directory tree to `url` (gs://...), file by file."""
  for root, _, files in os.walk(local_dir):
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), local_dir)
      with open(os.path.join(root, name), 'rb') as f:
        (epath.Path(url) / rel).write_bytes(f.read())


@pytest.fixture(scope='module')
def corpus(gcs, tmp_path_factory):
  """The same files on local disk and in gs://BUCKET/data: the training text split in two files
  (so a glob matches several), the eval text, the vocabulary."""
  local = tmp_path_factory.mktemp('data')
  text = open(os.path.join(ASSETS, 'train.txt'), encoding='utf-8').read()
  cut = text.index('\n\n', len(text) // 2) + 2
  (local / 'train_a.txt').write_text(text[:cut], encoding='utf-8')
  (local / 'train_b.txt').write_text(text[cut:], encoding='utf-8')
  for name in ('valid.txt', 'vocab.txt'):
    (local / name).write_bytes(open(os.path.join(ASSETS, name), 'rb').read())
  upload(local, f'gs://{BUCKET}/data')
  return str(local), f'gs://{BUCKET}/data'


def data_overrides(root, cache):
  return {'train_files': f'{root}/train_*.txt', 'eval_files': f'{root}/valid.txt',
          'vocab_path': f'{root}/vocab.txt', 'cache_dir': cache}


def losses(workdir):
  """step -> (train/loss, train/grad_norm), asserting one row per step (nothing repeated)."""
  rows = [json.loads(l) for l in epath.Path(workdir, 'metrics.jsonl').read_text().splitlines()]
  train_rows = [r for r in rows if 'train/loss' in r]
  assert len({r['step'] for r in train_rows}) == len(train_rows), 'a repeated train row'
  return {r['step']: (r['train/loss'], r['train/grad_norm']) for r in train_rows}


def final_digest(workdir):
  step, state, _ = ckpt.read_checkpoint(f'{workdir}/checkpoints')
  return step, ckpt.digest(state)


@pytest.fixture(scope='module')
def local_run(corpus, tmp_path_factory):
  """The reference: the run on local disk, uninterrupted, with local data."""
  workdir = str(tmp_path_factory.mktemp('local_run'))
  cache = str(tmp_path_factory.mktemp('cache'))
  train.train_and_evaluate(tiny(**data_overrides(corpus[0], cache)), workdir)
  return workdir


def _cli(workdir, cwd, overrides):
  cmd = [sys.executable, '-m', 'mlm_jax.main', f'--config={REPO}/tests/resume_config.py',
         f'--workdir={workdir}', *[f'--config.data.{k}={v}' for k, v in overrides.items()]]
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)  # os.environ: the emulator's
  return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, env=env)


@pytest.fixture(scope='module')
def gcs_run(corpus, tmp_path_factory):
  """gs://BUCKET/run with data from gs://BUCKET/data (indexes cached beside it): started, SIGKILLed
  once step 4 is committed, started again to the end. Returns (run url, stderr of the kill)."""
  workdir = f'gs://{BUCKET}/run'
  cwd = tmp_path_factory.mktemp('cwd')  # where a run that wrote 'gs:' literally would leave it
  overrides = data_overrides(corpus[1], '{data}/.mlm_jax_index')
  proc = _cli(workdir, cwd, overrides)
  marker = epath.Path(workdir, 'checkpoints', '4', ckpt.COMMIT_MARKER)
  deadline = time.time() + 600
  while not marker.exists():
    if proc.poll() is not None:
      raise AssertionError(f'run ended before step 4: {proc.stderr.read()[-3000:]}')
    if time.time() > deadline:
      proc.kill()
      raise AssertionError('timed out waiting for checkpoint 4')
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  err = proc.communicate(timeout=60)[1]
  assert proc.returncode == -signal.SIGKILL
  killed_rows = epath.Path(workdir, 'metrics.jsonl').read_text()
  proc = _cli(workdir, cwd, overrides)
  resumed_err = proc.communicate(timeout=900)[1]
  assert proc.returncode == 0, resumed_err[-3000:]
  assert 'resumed from step' in resumed_err, resumed_err[-3000:]
  assert os.listdir(cwd) == [], 'something was written to the local disk'
  return workdir, killed_rows, err


def test_killed_gcs_run_resumes_like_the_local_run(local_run, gcs_run):
  workdir, killed_rows, _ = gcs_run
  for line in killed_rows.splitlines(keepends=True):  # as the kill left it: whole rows only
    assert line.endswith('\n') and 'step' in json.loads(line)
  assert min(json.loads(l)['step'] for l in killed_rows.splitlines()) == 1
  assert max(json.loads(l)['step'] for l in killed_rows.splitlines()) >= 4  # flushed before the save
  assert losses(workdir) == losses(local_run)  # exact float equality, every step, once each
  assert len(losses(workdir)) == STEPS
  assert final_digest(workdir) == final_digest(local_run)
  run = epath.Path(workdir)
  assert json.loads((run / 'config.json').read_text())['data']['train_files'].startswith('gs://')
  assert data.load_tokenizer(str(run / 'tokenizer')).vocab_size == 2048
  assert list(run.glob('events.out.tfevents.*')), 'no TensorBoard events in the bucket'
  index = epath.Path(f'gs://{BUCKET}/data/.mlm_jax_index')
  assert sorted(p.name.split('.')[0] for p in index.glob('*.idx.npz')) == [
      'train_a', 'train_b', 'valid'], 'indexes not cached beside the data'


def test_evaluate_predict_export_import_from_gcs(local_run, gcs_run, tmp_path):
  need('safetensors')
  from tools import export_hf, import_hf, plot_metrics  # pylint: disable=import-outside-toplevel
  workdir = gcs_run[0]
  assert evaluate.evaluate(workdir) == evaluate.evaluate(local_run)
  assert (predict.Predictor(workdir).predict(TEXTS, top_k=3)
          == predict.Predictor(local_run).predict(TEXTS, top_k=3))

  hf_url, hf_local = f'gs://{BUCKET}/hf', str(tmp_path / 'hf')
  export_hf.export(workdir, hf_url)
  export_hf.export(local_run, hf_local)
  names = sorted(os.listdir(hf_local))
  assert 'model.safetensors' in names and 'vocab.txt' in names
  for name in names:
    if name in ('README.md', 'mlm_jax_config.json'):  # they name each run's own data files
      continue
    assert (epath.Path(hf_url) / name).read_bytes() == open(os.path.join(hf_local, name),
                                                            'rb').read(), name

  imported = f'gs://{BUCKET}/imported'
  import_hf.import_hf(hf_url, imported, tiny(), max_len=32)
  assert (predict.Predictor(imported).predict(TEXTS, top_k=3)
          == predict.Predictor(local_run).predict(TEXTS, top_k=3))

  png = plot_metrics.plot(workdir)
  assert png == f'{workdir}/metrics.png'
  assert epath.Path(png).read_bytes().startswith(b'\x89PNG')


def _same_records(a, b):
  """Same records, features, bad records and split keys, read in a scrambled order."""
  assert len(a) == len(b) > 0
  ids = np.random.default_rng(0).permutation(len(a))
  ra, rb = a.read(ids, sources.new_counts()), b.read(ids, sources.new_counts())
  assert ra.texts == rb.texts and len(ra.texts) == len(ra.keep_N)
  np.testing.assert_array_equal(ra.keep_N, rb.keep_N)
  assert ra.bad == rb.bad
  assert {k: list(v) for k, v in ra.features.items()} == {k: list(v) for k, v in rb.features.items()}
  np.testing.assert_array_equal(a.split_keys('', '')[0], b.split_keys('', '')[0])


@pytest.mark.parametrize('source, rows', [
    ('jsonl', [{'text': f'row {i} ' + 'x' * (i % 7), 'tld': i % 5} for i in range(300)]),
    ('domains', [f'host{i}.example.co.uk' if i % 9 else 'not a host' for i in range(300)]),
])
def test_sources_read_the_same_records_from_gcs(gcs, tmp_path, source, rows):
  name = f'{source}.txt'
  body = ''.join((json.dumps(r) if source == 'jsonl' else r) + '\n' for r in rows)
  (tmp_path / name).write_text(body)
  url = f'gs://{BUCKET}/sources/{tmp_path.name}/{name}'
  epath.Path(url).write_text(body)

  def config(root, cache):
    c = tiny(train_files=f'{root}/{source}*.txt', eval_files='', source=source, cache_dir=cache,
             tokenizer='char')
    c.model.extra_embeddings = {'tld': 8}
    c.data.tld_vocab_size = 8
    return c

  local = registry.open_source(config(str(tmp_path), str(tmp_path / 'cache')), 'train')
  remote_cache = f'gs://{BUCKET}/caches/{tmp_path.name}'
  remote = registry.open_source(config(url.rsplit('/', 1)[0], remote_cache), 'train')
  if source == 'domains':
    tok = domains.build_tokenizer(config(str(tmp_path), str(tmp_path / 'cache')),
                                  lambda: (local, np.arange(len(local))))
    local, remote = local.with_tokenizer(tok), remote.with_tokenizer(tok)
  _same_records(local, remote)
  assert list(epath.Path(remote_cache).glob('*.npz')), 'no index cached in the bucket'
  assert remote.where(len(remote) - 1) == f'{url}:{300}'


def test_text_index_streams_a_file_in_blocks(gcs, tmp_path, monkeypatch):
  """Indexing a gs:// file reads it in ranged reads of one block each (tiny blocks here), every
  byte once; records read back by ranged reads are those of the file, in any order."""
  lines = [f'line {i} ' + 'y' * (i % 13) for i in range(2000)]
  body = ('\n'.join(lines) + '\n').encode()
  url = f'gs://{BUCKET}/stream/{tmp_path.name}.txt'
  epath.Path(url).write_bytes(body)
  monkeypatch.setattr(textindex, '_BLOCK', 1000)
  ranges = []
  read = paths.RangeReader.read

  def spy(self, starts, ends):
    ranges.extend(zip(starts, ends))
    return read(self, starts, ends)

  monkeypatch.setattr(paths.RangeReader, 'read', spy)
  index = textindex.load_index(url, 'line', str(tmp_path / 'cache'))
  assert max(hi - lo for lo, hi in ranges) == 1000
  assert sorted(ranges) == [(lo, min(lo + 1000, len(body))) for lo in range(0, len(body), 1000)]
  monkeypatch.undo()
  src = sources.TextSource([url], 'line', str(tmp_path / 'cache2'))
  assert len(index['start']) == len(lines) == len(src)
  ids = np.array([1999, 0, 5, 6, 1000])
  assert src.read_raw(ids) == [lines[i].strip().encode() for i in ids]  # trimmed records


def test_metrics_jsonl_on_gcs_keeps_whole_rows_across_a_kill(gcs):
  """An object store cannot append: rows go up whole; after a 'kill' (the writer dropped without
  close) the object holds whole rows up to the last flush, and a resume drops the later ones."""
  workdir = f'gs://{BUCKET}/writer'
  w = metrics.Writer(workdir, enabled=True)
  for step in (1, 2, 3):
    w.write(step, {'train/loss': float(step)})
  w.flush()
  w.write(4, {'train/loss': 4.0})  # not flushed: lost by the kill, as its step is redone
  w.tb.close()  # (its atexit flush would outlive the emulator)
  del w
  path = epath.Path(workdir, 'metrics.jsonl')
  assert [json.loads(l)['step'] for l in path.read_text().splitlines()] == [1, 2, 3]
  w = metrics.Writer(workdir, enabled=True, resume_step=2)  # resumes from a checkpoint at step 2
  w.write(3, {'train/loss': 3.5})
  w.close()
  rows = [json.loads(l) for l in path.read_text().splitlines()]
  assert [(r['step'], r['train/loss']) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.5)]


def test_tfds_dataset_in_a_bucket(gcs, tmp_path):
  """A TFDS array_record dataset copied to gs:// reads the same records as the local one."""
  cmd = [sys.executable, os.path.join(REPO, 'tools', 'prepare_corpus.py'),
         f'--data_dir={tmp_path}/tfds', f'--cache_dir={tmp_path}/cache',
         '--files={assets}/shakespeare/valid.txt', '--text_unit=block', '--name=shakes_gcs',
         '--eval_fraction=0.2']
  subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
  url = f'gs://{BUCKET}/tfds/{tmp_path.name}'
  upload(tmp_path / 'tfds', url)

  def config(data_dir):
    c = tiny(source='tfds', tfds_name='shakes_gcs', tfds_data_dir=data_dir)
    return c

  local = registry.open_source(config(str(tmp_path / 'tfds')), 'train')
  remote = registry.open_source(config(url), 'train')
  assert len(local) == len(remote) > 100
  ids = np.linspace(0, len(local) - 1, 16).astype(np.int64)  # one ranged GET each: a sample
  assert (local.read(ids, sources.new_counts()).texts
          == remote.read(ids, sources.new_counts()).texts)


def test_paths_glob_and_atomic_writes_on_gcs(gcs):
  root = f'gs://{BUCKET}/globs'
  for name in ('a1.txt', 'a2.txt', 'b1.txt', 'sub/a3.txt'):
    paths.write_atomic(f'{root}/{name}', name)
  assert paths.glob(f'{root}/a*.txt') == [f'{root}/a1.txt', f'{root}/a2.txt']
  assert paths.glob(f'{root}/*/a*.txt') == [f'{root}/sub/a3.txt']
  assert paths.glob(f'{root}/b1.txt') == [f'{root}/b1.txt']
  assert paths.glob(f'{root}/nothing*') == [] and paths.glob(f'gs://{BUCKET}/none/*.txt') == []
  paths.write_json(f'{root}/c.json', {'b': 1, 'a': [2]})
  assert json.loads(epath.Path(f'{root}/c.json').read_text()) == {'a': [2], 'b': 1}
