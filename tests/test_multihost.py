"""Multi-process training through jax.distributed, two CPU processes on localhost (gloo collectives).

2 processes x 2 devices must train exactly like 1 process x 4 devices, and a checkpoint written by
one layout must resume in the other. Loopback only; every process is bounded in time and killed at
the end.
"""
import json
import os
import socket
import subprocess
import sys

import pytest

from mlm_jax import checkpoint as ckpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two logical input shards: the global batch is then the same for 1 and 2 processes. Gradients and
# sums added in device order (sharding.fixed_order_reduction): otherwise gloo's cross-process
# all-reduce adds in another order than the in-process one and the last bits differ (~4e-8).
OVERRIDES = ['--config.train.steps=8', '--config.checkpoint.every=4', '--config.train.eval_every=4',
             '--config.data.num_shards=2', '--config.sharding.fixed_order_reduction=true']


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  return env


def _cmd(workdir, *extra):
  return [sys.executable, '-m', 'mlm_jax.main', '--config=tests/resume_config.py',
          f'--workdir={workdir}', *OVERRIDES, *extra]


def run_single(workdir, *extra, devices=4):
  proc = subprocess.run(_cmd(workdir, *extra), cwd=REPO, env=_env(devices), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]


def run_two_processes(workdir, *extra):
  port = _free_port()
  procs = [subprocess.Popen(_cmd(workdir, *extra, f'--coordinator_address=127.0.0.1:{port}',
                                 '--num_processes=2', f'--process_id={i}'),
                            cwd=REPO, env=_env(2), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    errs = [p.communicate(timeout=300)[1] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, err in zip(procs, errs):
    assert p.returncode == 0, err[-3000:]


def losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {r['step']: r['train/loss'] for r in rows if 'train/loss' in r}


def eval_losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {r['step']: r['eval/loss'] for r in rows if 'eval/loss' in r}


def assert_same_training(workdir, reference):
  """Bitwise the same run: per-step train and eval losses, and the final checkpoint's digest."""
  assert losses(workdir) == losses(reference)
  assert len(losses(workdir)) == 8
  assert eval_losses(workdir) == eval_losses(reference)
  (step_a, _, meta_a), (step_b, _, meta_b) = (ckpt.read_checkpoint(os.path.join(w, 'checkpoints'))
                                              for w in (workdir, reference))
  assert step_a == step_b == 8
  assert meta_a['state_sha256'] == meta_b['state_sha256']


@pytest.fixture(scope='module')
def one_process(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('one_process'))
  run_single(workdir)
  return workdir


def test_two_processes_train_like_one(one_process, tmp_path):
  workdir = str(tmp_path)
  run_two_processes(workdir)
  assert_same_training(workdir, one_process)


@pytest.mark.slow  # six multi-process launches: minutes on a 2-core machine
def test_checkpoints_move_between_process_layouts(one_process, tmp_path):
  two_then_one, one_then_two = str(tmp_path / 'a'), str(tmp_path / 'b')
  run_two_processes(two_then_one, '--stop_after=4')
  run_single(two_then_one)
  run_single(one_then_two, '--stop_after=4')
  run_two_processes(one_then_two)
  for workdir in (two_then_one, one_then_two):
    assert_same_training(workdir, one_process)
