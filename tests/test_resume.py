"""Exact resume: an interrupted run (stop, SIGTERM, SIGKILL) continues bitwise like an uninterrupted one."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import quickstart
from mlm_jax import checkpoint as ckpt
from mlm_jax import train
from mlm_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12


def tiny(**data):
  c = quickstart.get_config()
  c.model.update(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64, max_len=32)
  c.train.update(steps=STEPS, batch_size=8, log_every=1, eval_every=6, eval_steps=2,
                 progress_bar=False, compilation_cache_dir='')
  c.optimizer.warmup_steps = 3
  c.checkpoint.update(every=4, keep=3)
  c.data.update(**data)
  return c


def losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {r['step']: (r['train/loss'], r['train/grad_norm']) for r in rows if 'train/loss' in r}


def final_digest(workdir):
  step, state, _ = ckpt.read_checkpoint(os.path.join(workdir, 'checkpoints'))
  return step, ckpt.digest(state)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """One uninterrupted run: per-step losses and the final checkpoint digest."""
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  train.train_and_evaluate(tiny(), workdir)
  return losses(workdir), final_digest(workdir)


@pytest.mark.parametrize('num_workers', [0, 2])
def test_stop_and_resume_is_bitwise_identical(reference, tmp_path, num_workers):
  workdir = str(tmp_path)
  config = tiny(num_workers=num_workers)
  out = train.train_and_evaluate(config, workdir, stop_after=5)  # not on a checkpoint interval
  assert out['step'] == 5
  train.train_and_evaluate(config, workdir)
  ref_losses, ref_digest = reference
  assert losses(workdir) == ref_losses  # exact float equality, every step
  assert final_digest(workdir) == ref_digest


def test_resume_refuses_a_changed_model(tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny(), workdir, stop_after=2)
  changed = tiny()
  changed.model.intermediate_size = 128
  with pytest.raises(ConfigError, match='model.intermediate_size'):
    train.train_and_evaluate(changed, workdir)


def test_nonfinite_loss_halts_without_saving_nan(tmp_path):
  workdir = str(tmp_path)
  config = tiny()
  config.optimizer.update(learning_rate=1e30, clip_norm=0.0, warmup_steps=0)  # diverges
  with pytest.raises(train.TrainingHalted, match='non-finite'):
    train.train_and_evaluate(config, workdir)
  steps_saved = os.listdir(os.path.join(workdir, 'checkpoints'))
  for step in steps_saved:
    _, state, _ = ckpt.read_checkpoint(os.path.join(workdir, 'checkpoints'), int(step))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state) if x.dtype.kind == 'f')


def _cli(workdir, *extra):
  cmd = [sys.executable, '-m', 'mlm_jax.main', '--config=tests/resume_config.py',
         f'--workdir={workdir}', *extra]
  return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'))


def _wait_for_step(workdir, step, proc, timeout=300):
  path = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f'run ended early: {proc.stderr.read()[-2000:]}')
    if os.path.exists(path) and any(json.loads(l).get('step', 0) >= step
                                    for l in open(path) if l.endswith('\n')):
      return
    time.sleep(0.05)
  proc.kill()
  raise AssertionError('timed out')


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGKILL])
def test_killed_cli_run_resumes_bitwise(reference, tmp_path, sig):
  workdir = str(tmp_path)
  proc = _cli(workdir)
  _wait_for_step(workdir, 4 if sig == signal.SIGKILL else 7, proc)  # SIGKILL: around a save
  proc.send_signal(sig)
  err = proc.communicate(timeout=300)[1]
  if sig == signal.SIGTERM:
    assert proc.returncode == 0, err[-2000:]
    assert 'preempted' in err
  else:
    assert proc.returncode == -signal.SIGKILL
  proc = _cli(workdir)
  err = proc.communicate(timeout=600)[1]
  assert proc.returncode == 0, err[-2000:]
  ref_losses, ref_digest = reference
  assert losses(workdir) == ref_losses
  assert final_digest(workdir) == ref_digest
