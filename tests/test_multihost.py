"""Multi-process training through jax.distributed, two CPU processes on localhost (gloo collectives).

2 processes x 2 devices must train exactly like 1 process x 4 devices, a checkpoint written by
one layout must resume in the other, only process 0 writes the run (process 1 only its own array
shards inside checkpoints), and a pair of which one process is killed or preempted resumes
bitwise. Loopback only; every process is bounded in time and killed at the end.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest

from mlm_jax import checkpoint as ckpt
from tools import fault_trial

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two logical input shards: the global batch is then the same for 1 and 2 processes. Gradients and
# sums added in device order (sharding.fixed_order_reduction): otherwise gloo's cross-process
# all-reduce adds in another order than the in-process one and the last bits differ (~4e-8).
# The test session's compilation cache: restarted processes load their programs.
OVERRIDES = ['--config.train.steps=8', '--config.checkpoint.every=4', '--config.train.eval_every=4',
             '--config.data.num_shards=2', '--config.sharding.fixed_order_reduction=true',
             f'--config.train.compilation_cache_dir={jax.config.jax_compilation_cache_dir or ""}']
# Long enough to kill or preempt one process mid-run, after the checkpoint at step 4.
LONG = ['--config.train.steps=16']


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


def start_two_processes(workdir, *extra, logs, umasks=('022', '022')):
  """Both processes of a pair, started; stderr of process i in `{logs}.{i}.log`."""
  port = _free_port()
  procs = []
  for i in range(2):
    cmd = _cmd(workdir, *extra, f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
               f'--process_id={i}')
    with open(f'{logs}.{i}.log', 'w') as log:  # a file, not a pipe: nobody has to drain it
      procs.append(subprocess.Popen(['sh', '-c', f'umask {umasks[i]} && exec "$@"', 'sh', *cmd],
                                    cwd=REPO, env=_env(2), stdout=subprocess.DEVNULL, stderr=log))
  return procs


def finish(procs, timeout):
  """Exit codes once all have ended; any still running after `timeout` s is killed (-9)."""
  deadline = time.time() + timeout
  for p in procs:
    try:
      p.wait(max(0.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()
  return [p.returncode for p in procs]


def _log(logs, i):
  with open(f'{logs}.{i}.log') as f:
    return f.read()


def _tail(logs, i):
  return _log(logs, i)[-3000:]


def run_two_processes(workdir, *extra, umasks=('022', '022')):
  logs = f'{workdir}.run{time.monotonic_ns()}'
  procs = start_two_processes(workdir, *extra, logs=logs, umasks=umasks)
  for i, code in enumerate(finish(procs, 300)):
    assert code == 0, _tail(logs, i)


def wait_for_step(workdir, step, procs, committed=0, timeout=300):
  """Returns once metrics.jsonl has a row of `step` or later and checkpoint `committed` (if any)
  is committed; fails if a process ended first."""
  path = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + timeout
  while time.time() < deadline:
    if any(p.poll() is not None for p in procs):
      raise AssertionError(f'a process ended before step {step}: {[p.poll() for p in procs]}')
    if (os.path.exists(path) and any(json.loads(l).get('step', 0) >= step
                                     for l in open(path) if l.endswith('\n'))
        and (not committed or committed in fault_trial.committed_steps(workdir))):
      return
    time.sleep(0.02)
  raise AssertionError(f'step {step} not reached in {timeout} s')


def losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {r['step']: r['train/loss'] for r in rows if 'train/loss' in r}


def eval_losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {r['step']: r['eval/loss'] for r in rows if 'eval/loss' in r}


def assert_same_training(workdir, reference, steps=8):
  """Bitwise the same run: per-step train and eval losses, and the final checkpoint's digest."""
  assert losses(workdir) == losses(reference)
  assert len(losses(workdir)) == steps
  assert eval_losses(workdir) == eval_losses(reference)
  (step_a, _, meta_a), (step_b, _, meta_b) = (ckpt.read_checkpoint(os.path.join(w, 'checkpoints'))
                                              for w in (workdir, reference))
  assert step_a == step_b == steps
  assert meta_a['state_sha256'] == meta_b['state_sha256']


@pytest.fixture(scope='module')
def one_process(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('one_process'))
  run_single(workdir)
  return workdir


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory):
  """An uninterrupted pair; process 1 with umask 077 (see test_only_process_0_writes_the_run)."""
  workdir = str(tmp_path_factory.mktemp('two_processes'))
  run_two_processes(workdir, umasks=('022', '077'))
  return workdir


@pytest.fixture(scope='module')
def two_processes_long(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('two_processes_long'))
  run_two_processes(workdir, *LONG)
  return workdir


def test_two_processes_train_like_one(one_process, two_processes):
  assert_same_training(two_processes, one_process)


# Orbax's per-process part of a checkpoint's array item: each process writes the array shards it
# holds (orbax 0.12 also splits a replicated array's writing among its replicas) into its own
# OCDBT database, plus a file of their metadata; process 0 then merges the manifests.
_PER_PROCESS = re.compile(r'^checkpoints/\d+/state/(ocdbt\.process_(\d+)(/.*)?|'
                          r'array_metadatas/process_(\d+))$')


def _tree(workdir):
  """{relative path: mode bits} of every file and directory under workdir."""
  out = {}
  for root, dirs, files in os.walk(workdir):
    for name in dirs + files:
      path = os.path.join(root, name)
      out[os.path.relpath(path, workdir)] = os.stat(path).st_mode & 0o777
  return out


def _layout(tree):
  """The paths that do not depend on the process count or on content: event files by kind, the
  content-named OCDBT data files by directory, no per-process parts."""
  out = set()
  for path in tree:
    if _PER_PROCESS.match(path):
      continue
    path = re.sub(r'events\.out\.tfevents\..*$', 'events.out.tfevents.*', path)
    out.add(re.sub(r'/d/[0-9a-f]{32}$', '/d/*', path))
  return out


def test_only_process_0_writes_the_run(two_processes, one_process):
  """Which process wrote a file, without strace: process 1 runs with umask 077 and process 0 with
  umask 022, so whatever process 1 creates lacks the group and other read bits and whatever
  process 0 creates has them (nothing in the run chmods). Every path process 1 created must be
  orbax's per-process part of a checkpoint (its array shards and their metadata, in names that
  carry its index); nothing else: no metrics, events, config, tokenizer or checkpoint metadata.
  A file that process 1 only appended to would keep process 0's bits, so also: the run's layout
  equals the single-process run's (apart from those per-process parts), and metrics.jsonl holds
  every step once.
  """
  tree = _tree(two_processes)
  by_process_1 = sorted(p for p, mode in tree.items() if not mode & 0o044)
  assert by_process_1, 'process 1 wrote no array shard: the umask method did not work'
  for path in by_process_1:
    m = _PER_PROCESS.match(path)
    assert m and (m.group(2) or m.group(4)) == '1', f'{path} was written by process 1'
  for path, mode in tree.items():
    if not (m := _PER_PROCESS.match(path)) or (m.group(2) or m.group(4)) == '0':
      assert mode & 0o044, path
  assert _layout(tree) == _layout(_tree(one_process))
  metrics = fault_trial.read_metrics(os.path.join(two_processes, 'metrics.jsonl'))
  assert metrics['duplicates'] == 0 and metrics['torn'] == 0
  assert sorted(metrics['train']) == list(range(1, 9))


@pytest.mark.slow  # six multi-process launches: minutes on a 2-core machine
def test_checkpoints_move_between_process_layouts(one_process, tmp_path):
  two_then_one, one_then_two = str(tmp_path / 'a'), str(tmp_path / 'b')
  run_two_processes(two_then_one, '--stop_after=4')
  run_single(two_then_one)
  run_single(one_then_two, '--stop_after=4')
  run_two_processes(one_then_two)
  for workdir in (two_then_one, one_then_two):
    assert_same_training(workdir, one_process)


@pytest.mark.slow  # two pairs and a hang timeout: ~1.5 minutes each on a 2-core machine
@pytest.mark.parametrize('victim', [0, 1])
def test_one_process_killed_both_restarted_resume_bitwise(two_processes_long, tmp_path, victim):
  """SIGKILL one process after step 6, once the checkpoint of step 4 is committed; the other dies
  or hangs in its next collective (killed after 20 s). Both restarted with the same commands
  finish the same run."""
  workdir, logs = str(tmp_path / 'run'), str(tmp_path / 'killed')
  procs = start_two_processes(workdir, *LONG, logs=logs)
  wait_for_step(workdir, 6, procs, committed=4)
  procs[victim].kill()
  codes = finish(procs, 20)
  assert codes[victim] == -signal.SIGKILL
  assert codes[1 - victim] != 0, 'the survivor finished a run its partner could not'
  assert 4 <= max(fault_trial.committed_steps(workdir)) < 16
  run_two_processes(workdir, *LONG)
  assert_same_training(workdir, two_processes_long, steps=16)


@pytest.mark.slow  # two pairs: ~1.5 minutes each on a 2-core machine
@pytest.mark.parametrize('signalled', [0, 1])
def test_sigterm_to_one_process_stops_both_at_one_step(two_processes_long, tmp_path, signalled):
  """SIGTERM to one process only: JAX's preemption notifier tells the coordination service, every
  process reaches orbax's `reached_preemption` at the same step, saves it and exits 0; the
  restarted pair finishes the same run."""
  workdir, logs = str(tmp_path / 'run'), str(tmp_path / 'preempted')
  procs = start_two_processes(workdir, *LONG, logs=logs)
  wait_for_step(workdir, 3, procs)
  procs[signalled].send_signal(signal.SIGTERM)
  codes = finish(procs, 120)
  assert codes == [0, 0], (codes, _tail(logs, 0), _tail(logs, 1))
  saved = [re.findall(r'preempted: saved step (\d+)', _log(logs, i)) for i in range(2)]
  assert saved[0] and saved[0] == saved[1], saved
  step = int(saved[0][0])
  assert step < 16 and max(fault_trial.committed_steps(workdir)) == step
  run_two_processes(workdir, *LONG)
  assert_same_training(workdir, two_processes_long, steps=16)
