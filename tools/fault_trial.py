"""Fault trial: SIGKILL a training run at random moments, resume each time, compare with a clean run.

  python tools/fault_trial.py --kills 10 --seed 0 [--config tests/resume_config.py] [--workdir DIR]
                              [--config.train.steps=48 ...]

1. A reference run of the CLI, uninterrupted.
2. The same command in a fresh workdir, SIGKILLed `--kills` times, each time after a seeded random
   delay drawn uniformly from [0, T]; rerun with the same command after each kill.
   T is the reference's wall time of what this attempt has left to do: its start-up (up to the
   first step) plus the reference's time from the step this attempt resumes at to the end. So kills
   land in start-up, restore, compilation, steps, evals and asynchronous saves alike.
3. One last run to completion.

A kill drawn after the attempt finished by itself is a "no kill" and is reported. Once a run has
saved its last step (finished by itself or killed in its shut-down) it gets its final run and is
compared; the remaining kills go to a new run (a new "round") in a fresh workdir, so that they do
not all land in the start-up of a run that has nothing left to do.

Each round's final checkpoint digest and every per-step train and eval metric of metrics.jsonl must
be bitwise those of the reference (timings excepted; the last line of a step counts: a killed run
redoes the steps after its checkpoint). Lines of steps that appear twice are counted and reported.
One line per attempt, and last `RESULT kills=N identical=true|false`; exit status 0 when identical.
"""
import argparse
import datetime
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A few dozen steps of the tiny resume config, every step logged, frequent saves and evals.
DEFAULT_OVERRIDES = ('--config.train.steps=80', '--config.train.log_every=1',
                     '--config.checkpoint.every=4', '--config.checkpoint.async_save=true',
                     '--config.train.eval_every=10', '--config.train.eval_steps=2')
# Metrics that measure time: they differ between any two runs.
TIMING = ('tokens_per_sec', 'step_time', 'mfu', 'data_wait_fraction', 'blocking_s')
_STEP_LINE = re.compile(r'^I\d{4} (\d\d):(\d\d):(\d\d\.\d+) .*\] step (\d+): train/loss=')


# -- metrics -----------------------------------------------------------------------------------


def read_metrics(path: str) -> dict:
  """metrics.jsonl as {'train': {step: row}, 'eval': {step: row}, 'duplicates', 'torn'}.

  A row is a train row if it has train/loss, an eval row if it has eval/loss (other rows, e.g.
  checkpoint timings, are ignored). The last row of a (kind, step) wins; `duplicates` counts the
  (kind, step) pairs written more than once, `torn` the lines that are not JSON (cut by a kill).
  """
  out = {'train': {}, 'eval': {}, 'duplicates': 0, 'torn': 0}
  seen = set()
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        out['torn'] += 1
        continue
      kind = 'train' if 'train/loss' in row else 'eval' if 'eval/loss' in row else None
      if kind is None:
        continue
      key = (kind, row['step'])
      out['duplicates'] += key in seen
      seen.add(key)
      out[kind][row['step']] = {k: v for k, v in row.items()
                                if k != 'step' and not k.endswith(TIMING)}
  return out


def compare(reference: dict, trial: dict) -> list[str]:
  """Differences between two runs' results ({'digest': (step, sha), 'train', 'eval'}), as lines."""
  problems = []
  if trial['digest'] != reference['digest']:
    problems.append(f"final checkpoint (step, sha256): {trial['digest']} != reference "
                    f"{reference['digest']}")
  for kind in ('train', 'eval'):
    ref, got = reference[kind], trial[kind]
    if missing := sorted(set(ref) - set(got)):
      problems.append(f'{kind}: steps {missing} missing')
    if extra := sorted(set(got) - set(ref)):
      problems.append(f'{kind}: steps {extra} not in the reference')
    for step in sorted(set(ref) & set(got)):
      for k in sorted(ref[step].keys() | got[step].keys()):
        if ref[step].get(k) != got[step].get(k):
          problems.append(f'{kind} step {step} {k}: {got[step].get(k)!r} != reference '
                          f'{ref[step].get(k)!r}')
  return problems


def final_digest(workdir: str) -> tuple[int, str]:
  """(step, sha256) of the newest checkpoint, recomputed from its arrays (and checked against the
  digest recorded at save time: a mismatch is reported as a different digest)."""
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  sys.path.insert(0, REPO)
  from absl import logging  # pylint: disable=import-outside-toplevel
  from mlm_jax import checkpoint  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.ERROR)  # orbax warns that the directory is opened read-only
  step, state, meta = checkpoint.read_checkpoint(os.path.join(workdir, 'checkpoints'))
  sha = checkpoint.digest(state)
  if sha != meta.get('state_sha256'):
    sha = f"{sha} (recorded {meta.get('state_sha256')}: corrupt)"
  return step, sha


def results(workdir: str) -> dict:
  metrics = read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  return {**metrics, 'digest': final_digest(workdir)}


# -- runs --------------------------------------------------------------------------------------


def committed_steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d)
                if n.isdigit() and os.path.exists(os.path.join(d, n, 'commit_success.txt')))


def _log_seconds(h, m, s) -> float:
  return int(h) * 3600 + int(m) * 60 + float(s)


def step_times(log: str, started: float) -> dict[int, float]:
  """Seconds after `started` (a time.time()) at which each step's train line was logged."""
  day = datetime.datetime.fromtimestamp(started)
  midnight = day.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
  out = {}
  for line in log.splitlines():
    if m := _STEP_LINE.match(line):
      out.setdefault(int(m.group(4)), (_log_seconds(*m.group(1, 2, 3)) + midnight - started)
                     % 86400)
  return out


def _tmp_dirs(workdir: str) -> set[str]:
  """Orbax's '<step>.orbax-checkpoint-tmp*' directories: saves not committed (yet)."""
  ckpts = os.path.join(workdir, 'checkpoints')
  return {n for n in (os.listdir(ckpts) if os.path.isdir(ckpts) else []) if 'tmp' in n}


def phase(log: str, workdir: str, eval_every: int, leftovers=frozenset()) -> str:
  """Best guess of what a killed run was doing, from its last log line and the checkpoint dir
  (`leftovers`: tmp directories that were there before the run started)."""
  lines = [l.split('] ', 1)[1] for l in log.splitlines() if l[:1] in 'IWEF' and '] ' in l]
  saving = sorted(_tmp_dirs(workdir) - set(leftovers))
  suffix = f' + save in flight ({", ".join(saving)})' if saving else ''
  if not lines:
    return 'start-up: imports, config, tokenizer' + suffix
  last = lines[-1]
  if m := re.match(r'step (\d+)(: train/|/\d+ )', last):  # its metrics or its progress line
    step = int(m.group(1))
    what = 'eval' if eval_every and step % eval_every == 0 else 'steps'
    return f'{what} (after step {step})' + suffix
  if m := re.match(r'step (\d+): (eval/|checkpoint/)', last):
    return f'steps (after the {m.group(2)[:-1]} of step {m.group(1)})' + suffix
  if last.startswith('Checkpoint step') or 'tracked_metric' in last:
    return 'save' + suffix
  if last.startswith('data/eval'):
    return 'eval' + suffix
  if last.startswith(('resumed from', 'Restored')) or 'long_records' in last:
    return 'first batch / compilation' + suffix
  if last.startswith('model:'):
    return 'input pipeline start-up' + suffix
  if last.startswith('data/train'):
    return 'restore (or init)' + suffix
  if last.startswith(('compiled', 'ran the first step')):
    return 'first steps' + suffix
  if last.startswith('best '):
    return 'shutdown' + suffix
  return f'after "{last[:60]}"' + suffix


class Runner:
  """Starts the CLI on one workdir with one fixed command."""

  def __init__(self, config: str, overrides: list[str], cache_dir: str):
    self.cmd = [sys.executable, '-m', 'mlm_jax.main', f'--config={config}',
                f'--config.train.compilation_cache_dir={cache_dir}', *overrides]
    self.env = dict(os.environ, JAX_PLATFORMS='cpu', MLM_JAX_NO_LAUNCH='1')

  def start(self, workdir: str, log_path: str):
    log = open(log_path, 'w')
    proc = subprocess.Popen([*self.cmd, f'--workdir={workdir}'], cwd=REPO, env=self.env,
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc


def _tail(path: str, n: int = 2000) -> str:
  with open(path) as f:
    return f.read()[-n:]


def trial(kills: int, seed: int, config: str, overrides: list[str], workdir: str,
          timeout: float = 600.0, out=print) -> dict:
  """Runs the reference and the killed run; returns a summary with 'identical' and 'problems'."""
  os.makedirs(workdir, exist_ok=True)
  cache = os.path.join(workdir, 'xla_cache')
  runner = Runner(config, overrides, cache)
  eval_every = next((int(o.split('=')[1]) for o in reversed(overrides)
                     if o.startswith('--config.train.eval_every=')), 0)
  ref_dir = os.path.join(workdir, 'reference')
  shutil.rmtree(ref_dir, ignore_errors=True)

  # Compile the train and eval steps into the cache first: the reference's timeline (and so T)
  # is then that of a warm start, like the resumed runs'.
  warm = os.path.join(workdir, 'warmup')
  shutil.rmtree(warm, ignore_errors=True)
  runner.cmd.append(f'--stop_after={max(eval_every, 1)}')
  code = runner.start(warm, warm + '.log').wait(timeout)
  runner.cmd.pop()
  if code != 0:
    raise RuntimeError(f'warm-up run failed:\n{_tail(warm + ".log")}')
  shutil.rmtree(warm)

  started = time.time()
  proc = runner.start(ref_dir, ref_dir + '.log')
  if proc.wait(timeout) != 0:
    raise RuntimeError(f'reference run failed:\n{_tail(ref_dir + ".log")}')
  ref_wall = time.time() - started
  with open(ref_dir + '.log') as f:
    times = step_times(f.read(), started)
  first, total = times[min(times)], max(times)
  out(f'reference: {ref_wall:.1f}s ({len(times)} steps, first step at {first:.1f}s)')

  rng = random.Random(seed)
  ref = results(ref_dir)
  landed, attempt, no_kills, duplicates, problems, rounds = 0, 0, 0, 0, [], 0
  while landed < kills:
    rounds += 1
    run_dir = os.path.join(workdir, f'killed{rounds}')
    shutil.rmtree(run_dir, ignore_errors=True)
    finished = False
    # A run whose last step is saved has nothing left to kill: finish it, go on in a new round.
    while landed < kills and not finished and max(committed_steps(run_dir), default=0) < total:
      attempt += 1
      if attempt > 4 * kills + 4:
        raise RuntimeError(f'only {landed} of {kills} kills landed in {attempt - 1} attempts')
      resume = max(committed_steps(run_dir), default=0)
      # What is left: start-up to the first step, then the reference's time from `resume` on.
      span = first + ref_wall - times.get(resume + 1, ref_wall)
      at = rng.uniform(0.0, span)
      log_path = f'{run_dir}.{attempt}.log'
      leftovers = _tmp_dirs(run_dir)
      started = time.time()
      proc = runner.start(run_dir, log_path)
      head = f'round {rounds} attempt {attempt}: resumes at step {resume},'
      where = 'ended before the kill'
      try:
        code = proc.wait(max(0.0, started + at - time.time()))
      except subprocess.TimeoutExpired:
        with open(log_path) as f:
          where = phase(f.read(), run_dir, eval_every, leftovers)
        os.kill(proc.pid, signal.SIGKILL)
        code = proc.wait()
      if code == -signal.SIGKILL:
        landed += 1
        out(f'{head} kill {landed} at {at:.2f}s of {span:.1f}s: {where}; exit code {code}')
        continue
      no_kills += 1
      out(f'{head} kill drawn at {at:.2f}s of {span:.1f}s came after the run ended (exit code '
          f'{code} at {time.time() - started:.2f}s): no kill')
      if code != 0:
        raise RuntimeError(f'{head} failed by itself:\n{_tail(log_path)}')
      finished = True
    if not finished:  # one last run to completion
      resume = max(committed_steps(run_dir), default=0)
      code = runner.start(run_dir, run_dir + '.final.log').wait(timeout)
      out(f'round {rounds} final run: resumes at step {resume}, exit code {code}')
      if code != 0:
        raise RuntimeError(f'final run failed:\n{_tail(run_dir + ".final.log")}')
    got = results(run_dir)
    diffs = compare(ref, got)
    set_aside = [n for n in os.listdir(os.path.join(run_dir, 'checkpoints')) if 'corrupt' in n]
    out(f"round {rounds}: final checkpoint step {got['digest'][0]} sha256 {got['digest'][1][:16]}"
        f"... (reference {ref['digest'][1][:16]}...); {len(got['train'])} train and "
        f"{len(got['eval'])} eval steps compared, {len(diffs)} differ; duplicated step lines: "
        f"{got['duplicates']}; torn lines: {got['torn']}; checkpoints kept "
        f"{committed_steps(run_dir)} (reference {committed_steps(ref_dir)}); set aside as "
        f'corrupt: {set_aside or "none"}')
    for d in diffs[:20]:
      out(f'DIFF round {rounds}: {d}')
    problems += diffs
    duplicates += got['duplicates']
  return {'identical': not problems, 'problems': problems, 'kills': landed, 'no_kills': no_kills,
          'duplicates': duplicates, 'rounds': rounds}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--kills', type=int, default=10, help='SIGKILLs that must land')
  parser.add_argument('--seed', type=int, default=0, help='seed of the kill times')
  parser.add_argument('--config', default='tests/resume_config.py', help='config file')
  parser.add_argument('--workdir', default=None, help='where the runs go (default: a temp dir, '
                      'removed afterwards)')
  parser.add_argument('--timeout', type=float, default=600.0, help='seconds per run at most')
  args, extra = parser.parse_known_args(argv)
  if bad := [a for a in extra if not a.startswith('--config.')]:
    parser.error(f'unknown arguments {bad} (only --config.x.y=v overrides pass through)')
  workdir = args.workdir or tempfile.mkdtemp(prefix='fault_trial_')
  try:
    summary = trial(args.kills, args.seed, args.config, [*DEFAULT_OVERRIDES, *extra],
                    os.path.abspath(workdir), timeout=args.timeout,
                    out=lambda s: print(s, flush=True))
  finally:
    if args.workdir is None:
      shutil.rmtree(workdir, ignore_errors=True)
  print(f"RESULT kills={summary['kills']} identical={str(summary['identical']).lower()}")
  return 0 if summary['identical'] else 1


if __name__ == '__main__':
  sys.exit(main())
