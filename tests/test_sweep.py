"""tools/sweep.py: eval loss alone (pruned), and multi-objective studies with their Pareto set.

Most tests replace train_and_evaluate with a fake that writes a metrics.jsonl of chosen numbers, so
the study's bookkeeping is checked against hand-worked answers in seconds; one trains for real.
"""
import json
import math
import os
import re
import subprocess
import sys

import pytest

from mlm_jax import train
from tests.conftest import need
from tests.test_resume import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _is_png(path):
  with open(path, 'rb') as f:
    return f.read(8) == b'\x89PNG\r\n\x1a\n'


def dominates(a, b, maximize):
  """a at least as good as b on every objective and better on one (brute force reference)."""
  better_eq = [(x >= y) if m else (x <= y) for x, y, m in zip(a, b, maximize)]
  strictly = [(x > y) if m else (x < y) for x, y, m in zip(a, b, maximize)]
  return all(better_eq) and any(strictly)


def brute_force_front(values: dict, maximize) -> set:
  """Trial numbers that no other trial dominates."""
  return {k for k, v in values.items()
          if not any(dominates(w, v, maximize) for j, w in values.items() if j != k)}


class FakeTrain:
  """train_and_evaluate that trains nothing: trial K's eval losses come from `losses[K]` (one per
  call) and its logged speeds from `speeds[K]`, written to metrics.jsonl like the real loop does."""

  def __init__(self, losses, speeds=None):
    self.losses, self.speeds, self.calls = losses, speeds or {}, []

  def __call__(self, config, workdir, stop_after=None):
    k = int(os.path.basename(workdir).split('_')[1])
    step = stop_after or config.train.steps
    self.calls.append((k, step))
    loss = self.losses[k][sum(1 for c in self.calls if c[0] == k) - 1]
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
      for i, speed in enumerate(self.speeds.get(k, [])):
        f.write(json.dumps({'step': i + 1, 'train/tokens_per_sec': speed}) + '\n')
      f.write(json.dumps({'step': step, 'eval/loss': loss}) + '\n')
    return {'eval/loss': loss, 'step': step}


def test_tokens_per_sec_is_the_median_after_the_first_logged_step(tmp_path):
  from tools import sweep
  rows = [(1, 5.0), (2, 100.0), (3, 300.0), (4, 900.0), (3, 200.0)]  # step 3 again: a resumed run
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    for step, v in rows:
      f.write(json.dumps({'step': step, 'train/tokens_per_sec': v, 'train/loss': 1.0}) + '\n')
    f.write(json.dumps({'step': 4, 'eval/loss': 2.0}) + '\n')
    f.write('{"step": 5, "train/tok')  # a line cut short by a kill
  assert sweep.tokens_per_sec(str(tmp_path)) == 200.0  # median of 100, 200 (the later 3), 900
  (tmp_path / 'metrics.jsonl').write_text('{"step": 7, "train/tokens_per_sec": 42.0}\n')
  assert sweep.tokens_per_sec(str(tmp_path)) == 42.0  # one window: that one
  (tmp_path / 'metrics.jsonl').write_text('{"step": 7, "eval/loss": 1.0}\n')
  assert math.isnan(sweep.tokens_per_sec(str(tmp_path)))


def test_flags_and_search_space():
  from tools import sweep
  assert sweep.parse_names('loss, peak_memory', tuple(sweep.OBJECTIVES), 'objectives') == (
      'loss', 'peak_memory')
  for bad in ('', 'loss,loss', 'speed'):
    with pytest.raises(sweep.SweepError, match='--objectives'):
      sweep.parse_names(bad, tuple(sweep.OBJECTIVES), 'objectives')
  c = tiny()  # batch 8 on 8 devices: half of it does not split
  assert sweep.batch_sizes(c) == [8, 16]
  c.train.batch_size = 32
  assert sweep.batch_sizes(c) == [16, 32, 64]
  c.train.grad_accum_steps = 4  # micro-batches of 16 / 4 = 4 do not split over 8 devices
  assert sweep.batch_sizes(c) == [32, 64]
  c.train.update(batch_size='auto', grad_accum_steps=1)  # 16 on CPU
  assert sweep.batch_sizes(c) == [8, 16, 32]
  assert sweep.search_space(c) == {'objectives': ['loss'], 'search': ['optimizer']}


def test_shape_search_makes_valid_configs():
  optuna = need('optuna')
  from mlm_jax import config as config_lib
  from tools import sweep
  base = tiny()
  base.train.batch_size = 'auto'  # an int must be able to replace it
  study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
  seen = []

  def objective(trial):
    overrides = sweep.suggest(trial, base, (1e-4, 1e-2), ('optimizer', 'shape'))
    config = sweep.trial_config(base, overrides, 40, 4)
    config_lib.validate(config)
    seen.append((config.train.batch_size, config.model.remat_policy, config.model.dtype))
    assert config.optimizer.learning_rate == trial.params['learning_rate']
    return 0.0

  study.optimize(objective, n_trials=12)
  assert {b for b, _, _ in seen} <= {8, 16, 32} and len({b for b, _, _ in seen}) > 1
  assert {r for _, r, _ in seen} <= set(sweep.REMAT_POLICIES)
  assert {d for _, _, d in seen} <= set(sweep.DTYPES)
  shape_only = optuna.create_study()
  shape_only.optimize(lambda t: len(sweep.suggest(t, base, (1e-4, 1e-2), ('shape',))), n_trials=1)
  assert set(shape_only.trials[0].params) == {'batch_size', 'remat_policy', 'dtype'}


def test_one_objective_prunes_on_eval_loss_as_before(tmp_path, monkeypatch):
  """Trials 0 and 1 start the pruner (n_startup_trials=2); trials 2 and 3 are worse than their
  median (1.5) at the first eval and are pruned there; with --no_prune all four finish."""
  need('optuna')
  from tools import sweep
  losses = {0: [1.0, 0.9, 0.8], 1: [2.0, 1.9, 1.8], 2: [3.0, 0.1, 0.1], 3: [4.0, 0.1, 0.1]}
  fake = FakeTrain(losses)
  monkeypatch.setattr(train, 'train_and_evaluate', fake)
  workdir = str(tmp_path / 'pruned')
  study = sweep.sweep(tiny(), workdir, trials=4, steps=6, evals=3, storage='')
  assert [t.state.name for t in study.trials] == ['COMPLETE', 'COMPLETE', 'PRUNED', 'PRUNED']
  assert study.trials[0].intermediate_values == {2: 1.0, 4: 0.9, 6: 0.8}  # sliced at each eval
  assert [c for c in fake.calls if c[0] == 2] == [(2, 2)]
  assert len(study.directions) == 1 and study.pruner.__class__.__name__ == 'MedianPruner'
  rows = json.load(open(os.path.join(workdir, 'sweep_summary.json')))
  assert [(r['trial'], r['state'], r['eval_loss']) for r in rows] == [
      (0, 'complete', 0.8), (1, 'complete', 1.8), (2, 'pruned', 3.0), (3, 'pruned', 4.0)]
  assert not os.path.exists(os.path.join(workdir, 'pareto.png'))
  out = sweep.report(study, workdir).splitlines()
  assert out[-3] == 'best: trial 0, eval/loss 0.8000'
  assert out[-2].startswith('  --config.optimizer.learning_rate=')
  assert out[-1] == 'RESULT trials=4 complete=2 best_trial=0 best_loss=0.8'

  monkeypatch.setattr(train, 'train_and_evaluate', FakeTrain(losses))
  study = sweep.sweep(tiny(), str(tmp_path / 'unpruned'), trials=4, steps=6, evals=3,
                      prune=False, storage='')
  assert [t.value for t in study.trials] == [0.8, 1.8, 0.1, 0.1]


def test_two_objectives_give_the_pareto_set(tmp_path, monkeypatch):
  """Hand-worked: (loss, tokens/s) = A(1.0, 100) B(2.0, 300) C(1.5, 200) D(2.0, 150) E(1.0, 90).
  D is dominated by C, E by A: the set is {A, B, C}. No pruning: each trial trains in one piece."""
  need('optuna')
  need('matplotlib')
  from tools import sweep
  values = {0: (1.0, 100.0), 1: (2.0, 300.0), 2: (1.5, 200.0), 3: (2.0, 150.0), 4: (1.0, 90.0)}
  fake = FakeTrain({k: [v[0]] for k, v in values.items()},
                   {k: [1.0, v[1], v[1] - 10, v[1] + 10] for k, v in values.items()})
  monkeypatch.setattr(train, 'train_and_evaluate', fake)
  workdir = str(tmp_path)
  study = sweep.sweep(tiny(), workdir, trials=5, steps=6, evals=3,
                      objectives=('loss', 'tokens_per_sec'))
  assert fake.calls == [(k, 6) for k in range(5)]
  assert [tuple(t.values) for t in study.trials] == [values[k] for k in range(5)]
  assert study.sampler.__class__.__name__ == 'NSGAIISampler'
  assert {t.number for t in study.best_trials} == {0, 1, 2}
  assert brute_force_front(values, (False, True)) == {0, 1, 2}

  summary = json.load(open(os.path.join(workdir, 'sweep_summary.json')))
  assert summary['objectives'] == {'loss': 'minimize', 'tokens_per_sec': 'maximize'}
  assert summary['pareto'] == [0, 2, 1]  # by loss
  assert [r['trial'] for r in summary['trials']] == [0, 2, 1, 4, 3]
  assert all(r['pareto'] == (r['trial'] in (0, 1, 2)) for r in summary['trials'])
  assert all('learning_rate' in r and r['state'] == 'complete' for r in summary['trials'])
  assert _is_png(os.path.join(workdir, 'pareto.png'))

  out = sweep.report(study, workdir, ('loss', 'tokens_per_sec')).splitlines()
  assert out[0].startswith('Pareto set: 3 of 5 completed trials')
  header = out[1].split()
  assert header[:3] == ['trial', 'loss', 'tokens_per_sec'] and 'learning_rate' in header
  assert [line.split()[:3] for line in out[3:6]] == [['0', '1', '100'], ['2', '1.5', '200'],
                                                     ['1', '2', '300']]
  assert out[-1] == ('RESULT trials=5 complete=5 pareto=3 best_loss=1 best_tokens_per_sec=300')

  # More trials join the study; another search in the same workdir is refused.
  monkeypatch.setattr(train, 'train_and_evaluate', FakeTrain({5: [0.5]}, {5: [1.0, 120.0]}))
  study = sweep.sweep(tiny(), workdir, trials=1, steps=6, evals=3,
                      objectives=('loss', 'tokens_per_sec'))
  assert {t.number for t in study.best_trials} == {5, 1, 2}  # F(0.5, 120) dominates A and E
  assert study.trials[5].params != study.trials[0].params  # the rerun's sampler is seeded past them
  with pytest.raises(sweep.SweepError, match='use a new --workdir'):
    sweep.sweep(tiny(), workdir, trials=1, objectives=('loss', 'peak_memory'))
  with pytest.raises(sweep.SweepError, match='use a new --workdir'):
    sweep.sweep(tiny(), workdir, trials=1)


def test_three_trial_two_objective_study_on_a_tiny_model(tmp_path):
  """Real training: loss and compiled peak memory (the shape knobs are in the slow CLI test: each
  new shape is another compile). The set Optuna reports equals the brute-force front of the
  trials' measured values."""
  need('optuna')
  need('matplotlib')
  from tools import sweep
  c = tiny()
  c.train.eval_steps = 1
  workdir = str(tmp_path)
  objectives = ('loss', 'peak_memory')
  study = sweep.sweep(c, workdir, trials=3, steps=2, evals=1, objectives=objectives,
                      population=2)
  assert [t.state.name for t in study.trials] == ['COMPLETE'] * 3
  values = {t.number: tuple(t.values) for t in study.trials}
  for t in study.trials:
    assert math.isfinite(t.values[0]) and t.user_attrs['peak_memory_source'] == 'compiled'
    assert t.values[1] == t.user_attrs['peak_memory'] > 0  # memory per device, in bytes
    assert t.user_attrs['tokens_per_sec'] > 0  # measured even when not an objective
    config = json.load(open(os.path.join(workdir, f'trial_{t.number}', 'config.json')))
    assert config['optimizer']['learning_rate'] == t.params['learning_rate']
  front = {t.number for t in study.best_trials}
  assert front and front == brute_force_front(values, (False, False))
  summary = json.load(open(os.path.join(workdir, 'sweep_summary.json')))
  assert set(summary['pareto']) == front and len(summary['trials']) == 3
  assert summary['peak_memory'] == sweep.MEMORY_SOURCES['compiled']
  assert _is_png(os.path.join(workdir, 'pareto.png'))
  last = sweep.report(study, workdir, objectives).splitlines()[-1]
  assert last.startswith(f'RESULT trials=3 complete=3 pareto={len(front)} best_loss=')
  best_loss = float(re.search(r'best_loss=(\S+)', last).group(1))
  assert math.isclose(best_loss, min(v[0] for v in values.values()), rel_tol=1e-5)


@pytest.mark.slow
def test_cli_three_objectives(tmp_path):
  """The command as a user runs it: table, plot, summary, and the RESULT line last."""
  need('optuna')
  need('matplotlib')
  workdir = str(tmp_path / 'sweep')
  cmd = [sys.executable, 'tools/sweep.py', '--config=tests/resume_config.py', f'--workdir={workdir}',
         '--trials=3', '--steps=2', '--evals=1', '--objectives=loss,tokens_per_sec,peak_memory',
         '--search=optimizer,shape', '--population=2', '--config.train.eval_steps=1']
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert re.fullmatch(r'RESULT trials=3 complete=3 pareto=[123] best_loss=\S+ '
                      r'best_tokens_per_sec=\S+ best_peak_memory=\d+', lines[-1]), lines[-1]
  assert 'peak_memory: compiled train step, bytes per device' in proc.stdout
  assert 'peak_memory_MiB' in proc.stdout and 'remat_policy' in proc.stdout
  summary = json.load(open(os.path.join(workdir, 'sweep_summary.json')))
  values = {r['trial']: (r['loss'], r['tokens_per_sec'], r['peak_memory'])
            for r in summary['trials']}
  assert set(summary['pareto']) == brute_force_front(values, (False, True, False))
  assert _is_png(os.path.join(workdir, 'pareto.png'))
  bad = subprocess.run(cmd[:5] + ['--objectives=loss,speed'], cwd=ROOT, capture_output=True,
                       text=True, check=False)
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
      'error: --objectives=')
