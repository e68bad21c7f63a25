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
