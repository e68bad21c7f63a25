"""Fault trials: random SIGKILLs (tools/fault_trial.py) and a full disk during a save."""
import datetime
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import pytest

from mlm_jax import checkpoint as ckpt
from mlm_jax import train
from tests.test_resume import final_digest, tiny
from tools import fault_trial

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_jsonl(path, rows, tail=''):
  with open(path, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
    f.write(tail)


def _train(step, loss, **extra):
  return {'step': step, 'train/loss': loss, 'train/grad_norm': 1.0 + step,
          'train/tokens_per_sec': 1000.0 * step, **extra}


def test_read_metrics_keeps_the_last_line_of_a_step(tmp_path):
  path = str(tmp_path / 'metrics.jsonl')
  _write_jsonl(path, [_train(1, 7.5), _train(2, 7.4), {'step': 2, 'eval/loss': 7.0},
                      {'step': 2, 'checkpoint/blocking_s': 0.1}, _train(3, 7.3),
                      _train(2, 7.25, **{'train/tokens_per_sec': 5.0}),  # redone after a kill
                      {'step': 2, 'eval/loss': 6.5}, _train(3, 7.2)],
               tail='{"step": 4, "train/lo')  # cut by a kill
  got = fault_trial.read_metrics(path)
  assert got['train'] == {1: {'train/loss': 7.5, 'train/grad_norm': 2.0},
                          2: {'train/loss': 7.25, 'train/grad_norm': 3.0},
                          3: {'train/loss': 7.2, 'train/grad_norm': 4.0}}
  assert got['eval'] == {2: {'eval/loss': 6.5}}
  assert got['duplicates'] == 3  # train 2, train 3, eval 2
  assert got['torn'] == 1


def _results(**changes):
  out = {'digest': (4, 'ab' * 32),
         'train': {s: {'train/loss': 8.0 - s / 8, 'train/grad_norm': 1.0} for s in (1, 2, 3, 4)},
         'eval': {2: {'eval/loss': 7.0}, 4: {'eval/loss': 6.0}}}
  out.update(changes)
  return out


def test_compare_accepts_identical_runs_and_flags_each_difference():
  ref = _results()
  assert fault_trial.compare(ref, _results()) == []

  one_ulp = _results()
  one_ulp['train'][3]['train/loss'] = math.nextafter(7.625, 8.0)  # the last bit differs
  problems = fault_trial.compare(ref, one_ulp)
  assert len(problems) == 1 and problems[0].startswith('train step 3 train/loss')

  eval_diff = _results()
  eval_diff['eval'][4]['eval/loss'] = 6.0000001
  assert fault_trial.compare(ref, eval_diff) == [
      'eval step 4 eval/loss: 6.0000001 != reference 6.0']

  missing = _results()
  del missing['train'][2]
  assert fault_trial.compare(ref, missing) == ['train: steps [2] missing']

  for digest in ((4, 'ab' * 31 + 'ac'), (3, 'ab' * 32)):
    problems = fault_trial.compare(ref, _results(digest=digest))
    assert len(problems) == 1 and problems[0].startswith('final checkpoint')


def test_step_times_reads_the_log_clock():
  started = 1_700_000_000.0  # a time.time()
  t = datetime.datetime.fromtimestamp(started + 2.5)
  line = (f'I{t:%m%d %H:%M:%S.%f} 1 metrics.py:126] step 1: train/loss=7.6, train/accuracy=0\n'
          f'I{t:%m%d %H:%M:%S.%f} 1 metrics.py:126] step 1: eval/loss=7.6\n')
  times = fault_trial.step_times(line, started)
  assert list(times) == [1] and times[1] == pytest.approx(2.5, abs=1e-5)


@pytest.mark.slow  # ~2 minutes on a 2-core machine: ~15 CLI starts
def test_ten_random_kills_resume_bitwise(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one device: faster starts
  proc = subprocess.run([sys.executable, 'tools/fault_trial.py', '--kills', '10', '--seed', '0',
                         f'--workdir={tmp_path}'], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=900)
  lines = proc.stdout.strip().splitlines()
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert lines[-1] == 'RESULT kills=10 identical=true'
  assert sum(' kill ' in l and 'exit code -9' in l for l in lines) == 10


# ---------------------------------------------------------------------------------------------
# A full disk during a save. The workdir is a 16 MiB tmpfs mounted in a private user + mount
# namespace (`unshare`: no privileges needed, nothing stays mounted). As soon as the first checkpoint
# (step 4) is committed, another process fills the disk to the last byte and keeps it full, so the
# save of step 8 (and every later write) meets a real ENOSPC from tensorstore or Python. Then the
# filler is stopped and deleted ("space freed") and the same command resumes. A run that hangs is
# killed after 5 minutes (status 137). The mount lives only as long as the namespace's
# shell, so the workdir is copied out after each run for the checks.

_FULL_DISK = r'''
set -u
mnt=$1; out=$2; shift 2
mount -t tmpfs -o size=16m tmpfs "$mnt" || exit 97
(while [ ! -e "$mnt/w/checkpoints/4/commit_success.txt" ]; do sleep 0.01; done
 while true; do  # and keeps it full: space freed by a failed write is taken again at once
   dd if=/dev/zero of="$mnt/filler" bs=4k oflag=append conv=notrunc 2>/dev/null; sleep 0.002
 done) &
filler=$!
timeout -s KILL 300 "$@" --workdir="$mnt/w" >/dev/null 2>"$out/full.err"; echo $? >"$out/full.rc"
kill $filler 2>/dev/null; wait $filler
cp -a "$mnt/w" "$out/after_failure"
rm -f "$mnt/filler"
timeout -s KILL 300 "$@" --workdir="$mnt/w" >/dev/null 2>"$out/resumed.err"; echo $? >"$out/resumed.rc"
cp -a "$mnt/w" "$out/resumed"
'''


def _namespaces_work() -> bool:
  if not shutil.which('unshare'):
    return False
  probe = subprocess.run(['unshare', '--user', '--map-root-user', '--mount', 'sh', '-c',
                          'mount -t tmpfs -o size=1m tmpfs /mnt'], capture_output=True)
  return probe.returncode == 0


def _rows(workdir, key):
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {r['step']: r[key] for r in rows if key in r}


@pytest.fixture(scope='module')
def full_disk(tmp_path_factory):
  """(reference workdir, output dir) of the full-disk scenario."""
  if not _namespaces_work():
    pytest.skip('needs `unshare --user --mount` (user namespaces) to mount a small tmpfs')
  reference = str(tmp_path_factory.mktemp('uninterrupted'))
  train.train_and_evaluate(tiny(), reference)
  out = tmp_path_factory.mktemp('full_disk')
  os.mkdir(out / 'mnt')
  cmd = [sys.executable, '-m', 'mlm_jax.main', '--config=tests/resume_config.py',
         f'--config.train.compilation_cache_dir={jax.config.jax_compilation_cache_dir or ""}']
  proc = subprocess.run(['unshare', '--user', '--map-root-user', '--mount', 'sh', '-c',
                         _FULL_DISK, 'sh', str(out / 'mnt'), str(out), *cmd],
                        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return reference, out


def test_full_disk_during_a_save_ends_with_one_error(full_disk):
  _, out = full_disk
  err = (out / 'full.err').read_text()
  assert (out / 'full.rc').read_text().strip() == '2', err[-3000:]
  errors = [l for l in err.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1, err[-3000:]
  assert 'No space left on device' in errors[0], errors[0]


def test_full_disk_keeps_the_previous_checkpoint(full_disk):
  _, out = full_disk
  assert (out / 'full.rc').read_text().strip() != '0'
  assert 'No space left on device' in (out / 'full.err').read_text()
  assert fault_trial.committed_steps(str(out / 'after_failure')) == [4]
  step, state, meta = ckpt.read_checkpoint(str(out / 'after_failure' / 'checkpoints'))
  assert step == 4 and ckpt.digest(state) == meta['state_sha256']


def test_full_disk_then_space_freed_resumes_bitwise(full_disk):
  reference, out = full_disk
  resumed = str(out / 'resumed')
  assert (out / 'resumed.rc').read_text().strip() == '0', (out / 'resumed.err').read_text()[-3000:]
  assert 'resumed from step 4' in (out / 'resumed.err').read_text()
  assert _rows(resumed, 'train/loss') == _rows(reference, 'train/loss')
  assert len(_rows(resumed, 'train/loss')) == 12
  assert _rows(resumed, 'eval/loss') == _rows(reference, 'eval/loss')
  assert final_digest(resumed) == final_digest(reference)
  assert not [n for n in os.listdir(os.path.join(resumed, 'checkpoints')) if 'tmp' in n]
