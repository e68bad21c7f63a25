"""The CLI as a user meets it: every expected failure ends with one `error:` line and a non-zero
status (never a traceback) and leaves what was written intact; 'auto' accumulation and a quick
trial run (`--config.train.steps=10`) work from the command line."""
import json
import os
import subprocess
import sys

import pytest

from mlm_jax import checkpoint as ckpt
from mlm_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ['--config.train.progress_bar=False', '--config.train.compilation_cache_dir=']


def cli(workdir, *args, config='tests/resume_config.py', timeout=300):
  env = dict(os.environ, JAX_PLATFORMS='cpu', MLM_JAX_NO_LAUNCH='1',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  return subprocess.run([sys.executable, '-m', 'mlm_jax.main', f'--workdir={workdir}',
                         f'--config={config}', *COMMON, *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


def assert_one_error_line(proc, *expected):
  assert proc.returncode != 0, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-4000:]
  last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
  assert last.startswith('error: '), proc.stderr[-2000:]
  assert sum(line.startswith('error: ') for line in proc.stderr.splitlines()) == 1
  for text in expected:
    assert text in last, last
  return last


def snapshot(workdir):
  """Every file under workdir with its bytes (what must survive a failed start)."""
  out = {}
  for root, _, files in os.walk(workdir):
    for f in files:
      path = os.path.join(root, f)
      with open(path, 'rb') as fh:
        out[os.path.relpath(path, workdir)] = fh.read()
  return out


def test_expected_failures_end_with_one_error_line(tmp_path):
  # Config: a bad value, caught before anything is written.
  bad = tmp_path / 'bad_config'
  assert_one_error_line(cli(bad, '--config.model.num_heads=3'), 'config.model.num_heads')
  assert not bad.exists()
  # Data: no file matches.
  assert_one_error_line(cli(tmp_path / 'no_data', '--config.data.train_files=/nonexistent/*.txt'),
                        '/nonexistent/*.txt')
  # Out of memory: no accumulation count fits a 1 KB device budget.
  assert_one_error_line(cli(tmp_path / 'oom', '--config.train.grad_accum_steps=auto',
                            '--config.train.device_memory_limit=1000'),
                        'does not fit in device memory', 'train.grad_accum_steps')
  # Halted training: a learning rate that blows the parameters up at once.
  halted = tmp_path / 'halted'
  assert_one_error_line(cli(halted, '--config.optimizer.learning_rate=1e30',
                            '--config.optimizer.clip_norm=0', '--config.optimizer.warmup_steps=0',
                            '--config.checkpoint.every=1'),
                        'non-finite loss', 'Halting')
  for name in os.listdir(halted / 'checkpoints'):  # what was saved before the halt is intact
    if name.isdigit():
      _, state, meta = ckpt.read_checkpoint(str(halted / 'checkpoints'), int(name))
      assert ckpt.digest(state) == meta['state_sha256']
  # Checkpoint: every checkpoint of a run unreadable.
  run = tmp_path / 'corrupt'
  assert cli(run, '--config.train.steps=4', '--config.checkpoint.every=2').returncode == 0
  metrics_before = (run / 'metrics.jsonl').read_bytes()
  for root, _, files in os.walk(run / 'checkpoints'):
    for f in files:
      if os.path.basename(root) == 'd':  # tensorstore chunk files
        open(os.path.join(root, f), 'wb').close()
  assert_one_error_line(cli(run, '--config.train.steps=4', '--config.checkpoint.every=2'),
                        'None of the checkpoints')
  assert (run / 'metrics.jsonl').read_bytes() == metrics_before
  assert sorted(n.split('.')[0] for n in os.listdir(run / 'checkpoints')) == ['2', '4']


def test_a_rejected_resume_changes_nothing(tmp_path):
  run = tmp_path / 'run'
  assert cli(run, '--config.train.steps=4').returncode == 0
  before = snapshot(run)
  assert_one_error_line(cli(run, '--config.train.steps=4', '--config.model.hidden_size=64'),
                        'config.model.hidden_size', 'breaks exact resume')
  assert snapshot(run) == before


def test_auto_accumulation_from_the_cli_is_recorded_and_resumes(tmp_path):
  run = tmp_path / 'run'
  for value in ('auto', '0'):  # both spellings; the second start resumes the first's run
    proc = cli(run, f'--config.train.grad_accum_steps={value}', '--config.train.steps=6',
               '--stop_after=3' if value == 'auto' else '--config.train.log_every=1')
    assert proc.returncode == 0, proc.stderr[-3000:]
  recorded = json.loads((run / 'config.json').read_text())['train']['grad_accum_steps']
  assert recorded == 1  # CPU has no memory limit: the fewest micro-batches
  for step in (3, 6):
    _, _, meta = ckpt.read_checkpoint(str(run / 'checkpoints'), step)
    assert meta['config']['train']['grad_accum_steps'] == 1


def test_auto_accumulation_picks_the_count_that_fits_the_budget(tmp_path):
  """In-process: a budget between the compiled sizes for 1 and 4 micro-batches makes 'auto' pick
  more than 1, and that count is what config.json and the checkpoint record."""
  from mlm_jax import autotune, data, train
  from tests.test_resume import tiny
  c = tiny()
  c.train.update(steps=2, eval_every=0, batch_size=32)
  c.model.update(hidden_size=64, intermediate_size=256, max_len=128)  # activations dominate
  trainer = train.Trainer(c)
  batch = next(iter(data.train_iterator(c, data.build_tokenizer(c))))
  need = {a: autotune.compiled_bytes(trainer.compile_train_step(batch, a)) for a in (1, 4)}
  assert need[4] < need[1]
  c.train.grad_accum_steps = 'auto'
  c.train.device_memory_limit = int((need[1] + need[4]) / 2 / autotune.DEFAULT_HEADROOM)
  train.train_and_evaluate(c, str(tmp_path))
  picked = json.loads((tmp_path / 'config.json').read_text())['train']['grad_accum_steps']
  assert 1 < picked <= 4
  _, _, meta = ckpt.read_checkpoint(str(tmp_path / 'checkpoints'))
  assert meta['config']['train']['grad_accum_steps'] == picked


@pytest.mark.parametrize('name', ['quickstart', 'mini_bert', 'domainbert:tiny', 'event_bert',
                                  'bert_base', 'bert_large', 'domainbert', 'modernbert_base',
                                  'modernbert_base:tiny', 'modernbert_base:mini'])
def test_every_shipped_config_accepts_a_ten_step_trial(name, caplog):
  """The first thing a user tries: `--config.train.steps=10`. A warmup longer than that warns
  (the rate never reaches its peak) instead of refusing."""
  import importlib
  module, _, variant = name.partition(':')
  get = importlib.import_module(f'configs.{module}').get_config
  c = get(variant) if variant else get()
  c.train.steps = 10
  if not c.data.vocab_path and c.data.tokenizer == 'wordpiece':  # bert_*: the user's vocab.txt
    c.data.vocab_path = '{assets}/shakespeare/vocab.txt'
  config_lib.validate(c)
  if c.optimizer.warmup_steps > 10:
    assert 'never reaches its peak' in caplog.text


def test_quick_trial_of_the_quickstart_runs(tmp_path):
  proc = cli(tmp_path / 'run', '--config.train.steps=10', '--config.train.eval_steps=1',
             config='configs/quickstart.py')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'never reaches its peak' in proc.stderr
