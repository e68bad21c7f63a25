"""End to end: the CLI on the quick-start config, config errors, the overfit-one-batch hook."""
import json
import os
import subprocess
import sys

import pytest

from configs import quickstart
from mlm_jax import config as config_lib
from mlm_jax import train
from mlm_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_KEYS = {'train/loss', 'train/accuracy', 'train/perplexity', 'train/grad_norm',
              'train/learning_rate', 'train/tokens_per_sec', 'train/step_time', 'train/mfu'}
EVAL_KEYS = {'eval/loss', 'eval/accuracy', 'eval/perplexity'}


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_cli_runs_the_quickstart_and_writes_its_files(tmp_path):
  workdir = str(tmp_path / 'run')
  cmd = [sys.executable, '-m', 'mlm_jax.main', '--config=configs/quickstart.py', f'--workdir={workdir}',
         '--config.train.steps=40', '--config.train.log_every=10', '--config.train.eval_every=20',
         '--config.train.eval_steps=2', '--config.optimizer.warmup_steps=5',
         '--config.train.progress_bar=False']
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = read_metrics(workdir)
  train_rows = [r for r in rows if 'train/loss' in r]
  eval_rows = [r for r in rows if 'eval/loss' in r]
  assert [r['step'] for r in train_rows] == [10, 20, 30, 40]
  assert [r['step'] for r in eval_rows] == [20, 40]
  assert all(TRAIN_KEYS <= r.keys() for r in train_rows)
  assert all(EVAL_KEYS <= r.keys() for r in eval_rows)
  assert train_rows[-1]['train/loss'] < train_rows[0]['train/loss']
  saved = json.load(open(os.path.join(workdir, 'config.json')))
  assert saved['train']['steps'] == 40 and saved['model']['dtype'] == 'float32'
  assert os.listdir(os.path.join(workdir, 'checkpoints'))
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))
  assert os.path.exists(os.path.join(workdir, 'tokenizer'))


def test_cli_rejects_an_unknown_field_with_its_name(tmp_path):
  cmd = [sys.executable, '-m', 'mlm_jax.main', '--config=configs/quickstart.py',
         f'--workdir={tmp_path}', '--config.model.hiden_size=64']
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert 'hiden_size' in proc.stderr


def test_bad_values_are_rejected_before_compiling():
  c = quickstart.get_config()
  c.model.num_heads = 3
  with pytest.raises(ConfigError, match='model.num_heads'):
    config_lib.validate(c)
  c = quickstart.get_config()
  c.optimizer.schedule = 'cosinus'
  with pytest.raises(ConfigError, match='optimizer.schedule'):
    config_lib.validate(c)
  c = quickstart.get_config()
  c.train.grad_accum_steps = 5
  with pytest.raises(ConfigError, match='train.grad_accum_steps'):
    config_lib.validate(c)
  c = quickstart.get_config()
  c.model.vocab_size = 1000
  with pytest.raises(ConfigError, match='model.vocab_size'):
    train.train_and_evaluate(c, '/nonexistent/never/created')


def test_overfit_one_batch_drives_the_loss_below_half(tmp_path):
  c = quickstart.get_config()
  c.train.update(overfit_one_batch=True, steps=300, batch_size=8, log_every=25, eval_every=0,
                 progress_bar=False)
  c.model.dropout = 0.0
  c.optimizer.update(warmup_steps=10, schedule='constant')
  c.checkpoint.every = 0
  train.train_and_evaluate(c, str(tmp_path))
  losses = [r['train/loss'] for r in read_metrics(str(tmp_path)) if 'train/loss' in r]
  assert losses[0] > 3.0
  assert min(losses) < 0.5, losses


def test_readme_documents_every_config_field():
  from tools import config_reference
  readme = open(os.path.join(REPO, 'README.md')).read()
  start, end = '<!-- config-reference:start -->\n', '<!-- config-reference:end -->'
  section = readme[readme.index(start) + len(start):readme.index(end)]
  assert section.strip() == config_reference.reference().strip(), (
      'README config reference is stale: run python tools/config_reference.py')


def test_profile_steps_write_a_trace(tmp_path):
  from tests.test_resume import tiny
  c = tiny()
  c.train.update(steps=4, profile_start_step=2, profile_num_steps=1, eval_every=0)
  train.train_and_evaluate(c, str(tmp_path))
  traces = [f for _, _, files in os.walk(tmp_path / 'profile') for f in files
            if f.endswith('.xplane.pb')]
  assert traces


@pytest.mark.slow  # two 200-step runs: ~2 minutes on a 2-core CPU
def test_bfloat16_loss_curve_is_within_one_percent_of_float32(tmp_path):
  """Mixed precision (bf16 compute, fp32 params and Adam state) on real text (the shipped
  Shakespeare): the loss at every logged step of 200 stays within 1% of the fp32 run's."""
  curves = {}
  for dtype in ('float32', 'bfloat16'):
    c = quickstart.get_config()
    c.model.dtype = dtype
    c.train.update(steps=200, log_every=20, eval_every=0, progress_bar=False)
    c.checkpoint.every = 0
    workdir = str(tmp_path / dtype)
    train.train_and_evaluate(c, workdir)
    curves[dtype] = {r['step']: r['train/loss'] for r in read_metrics(workdir) if 'train/loss' in r}
  assert curves['float32'].keys() == curves['bfloat16'].keys() and len(curves['float32']) == 10
  for step, fp32 in curves['float32'].items():
    assert abs(curves['bfloat16'][step] / fp32 - 1) < 0.01, (step, fp32, curves['bfloat16'][step])
