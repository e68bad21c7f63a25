"""Preemption-friendly logs and saves: plain log lines (no progress-bar frames) when stderr is not a
terminal, and a time bound on saves (checkpoint.every_seconds)."""
import os

from mlm_jax import train
from tests.test_cli_failures import cli
from tests.test_resume import tiny


def test_a_non_terminal_log_has_plain_lines_with_eta(tmp_path):
  proc = cli(tmp_path / 'run', '--config.train.steps=6', '--config.train.log_every=2',
             '--config.train.progress_bar=True')  # asked for, but stderr is a pipe here
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '\r' not in proc.stderr  # no carriage-return frames in a SLURM / cloud log
  lines = [line for line in proc.stderr.splitlines() if 'ETA' in line]
  assert [line.split('step ')[1].split()[0] for line in lines] == ['2/6', '4/6', '6/6'], lines
  assert all('loss' in line and 'tokens/s' in line for line in lines)


def test_every_seconds_saves_at_log_steps_when_due(tmp_path):
  c = tiny()
  c.train.update(steps=8, log_every=2, eval_every=0)
  c.checkpoint.update(every=0, every_seconds=1e-6, keep=10)  # always due: every log step saves
  train.train_and_evaluate(c, str(tmp_path / 'due'))
  saved = sorted(int(n) for n in os.listdir(tmp_path / 'due' / 'checkpoints') if n.isdigit())
  assert saved == [2, 4, 6, 8]
  c.checkpoint.every_seconds = 1e6  # never due: only the final save
  train.train_and_evaluate(c, str(tmp_path / 'not_due'))
  saved = sorted(int(n) for n in os.listdir(tmp_path / 'not_due' / 'checkpoints') if n.isdigit())
  assert saved == [8]


class _KilledAt:
  """A train iterator that dies when asked for the batch of step `step` (a crash mid-run)."""

  def __init__(self, inner, step):
    self.inner, self.step, self.calls = inner, step, 0

  def __next__(self):
    self.calls += 1
    if self.calls == self.step:
      raise RuntimeError('killed')
    return next(self.inner)

  def __getattr__(self, name):
    return getattr(self.inner, name)


def test_tensorboard_shows_each_step_once_after_a_resume(monkeypatch, tmp_path):
  """A run dies after logging steps 5-6 past its checkpoint at 4; the resumed run logs them again.
  TensorBoard itself (its EventAccumulator, which applies purges) reads the event files back: every
  step once, with the values of metrics.jsonl."""
  import json
  from tests.conftest import need
  need('tensorboard')
  from tensorboard.backend.event_processing import event_accumulator
  from mlm_jax import data as data_lib
  c = tiny()
  c.train.update(steps=8, log_every=1, eval_every=0)
  c.checkpoint.update(every=4)
  real = data_lib.train_iterator
  monkeypatch.setattr(data_lib, 'train_iterator', lambda *a, **k: _KilledAt(real(*a, **k), 7))
  workdir = str(tmp_path)
  try:
    train.train_and_evaluate(c, workdir)
  except RuntimeError:
    pass
  monkeypatch.undo()
  train.train_and_evaluate(c, workdir)
  events = [f for f in os.listdir(workdir) if f.startswith('events.out.tfevents')]
  assert len(events) == 2  # the killed run's file holds steps 1-6, the resumed one's 5-8
  acc = event_accumulator.EventAccumulator(workdir, purge_orphaned_data=True)
  acc.Reload()
  shown = {e.step: e.value for e in acc.Scalars('train/loss')}
  assert [e.step for e in acc.Scalars('train/loss')] == list(range(1, 9))
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  logged = {r['step']: r['train/loss'] for r in rows if 'train/loss' in r}
  assert sorted(logged) == list(range(1, 9))
  assert all(abs(shown[s] - logged[s]) < 1e-6 for s in logged)
