"""What the loop does when training goes wrong or stops paying off: non-finite losses (halt or
skip), early stopping, the gradient-norm warning, and 'auto' accumulation. Non-finite losses are
injected through the data (a NaN slot weight), so the jitted step's own guard is what is tested."""
import json
import logging
import os

import jax
import numpy as np
import pytest

from mlm_jax import checkpoint as ckpt
from mlm_jax import data as data_lib
from mlm_jax import train
from tests.test_resume import tiny


class _Poisoned:
  """A train iterator whose batches for the given (1-based) steps carry NaN slot weights."""

  def __init__(self, inner, steps):
    self.inner, self.steps, self.calls = inner, set(steps), 0

  def __next__(self):
    batch = dict(next(self.inner))
    self.calls += 1
    if self.calls in self.steps:
      batch['mlm_weights'] = np.full_like(batch['mlm_weights'], np.nan)
    return batch

  def __getattr__(self, name):  # get_state, set_state, close
    return getattr(self.inner, name)


def poison(monkeypatch, steps):
  real = data_lib.train_iterator
  monkeypatch.setattr(data_lib, 'train_iterator',
                      lambda *a, **k: _Poisoned(real(*a, **k), steps))


def metrics(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]


def saved_checkpoints(workdir):
  directory = os.path.join(workdir, 'checkpoints')
  out = {}
  for name in os.listdir(directory):
    if name.isdigit():
      _, state, meta = ckpt.read_checkpoint(directory, int(name))
      out[int(name)] = (state, meta)
  return out


def all_finite(state):
  return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(state)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def config(**train):
  c = tiny()
  c.train.update(**{'steps': 12, 'eval_every': 0, **train})
  c.checkpoint.update(every=2, keep=20, async_save=True)
  return c


def test_nonfinite_halt_after_two_saves_keeps_finite_checkpoints(monkeypatch, tmp_path):
  poison(monkeypatch, steps=[7])
  # Metrics are fetched one step late: step 7's arrive while step 8 (a save step) is due. The
  # halt must come before that save, and the bad update never reaches any checkpoint.
  with pytest.raises(train.TrainingHalted) as e:
    train.train_and_evaluate(config(nonfinite='halt', log_every=4), str(tmp_path))
  message = str(e.value)
  assert 'step 7' in message and 'newest checkpoint is step 6' in message, message
  saved = saved_checkpoints(str(tmp_path))
  assert sorted(saved) == [2, 4, 6]  # the run stopped before saving anything after the bad step
  for step, (state, meta) in saved.items():
    assert all_finite(state), step
    assert ckpt.digest(state) == meta['state_sha256']
  logged = [r['step'] for r in metrics(str(tmp_path)) if 'train/loss' in r]
  assert logged == [4]  # nothing from the interval of the bad step reached the metrics


def test_nonfinite_skip_counts_skipped_updates_and_leaves_params_alone(monkeypatch, tmp_path):
  poison(monkeypatch, steps=[5, 9])
  c = config(nonfinite='skip', max_nonfinite_in_a_row=2)
  c.checkpoint.every = 1
  out = train.train_and_evaluate(c, str(tmp_path))
  assert out['step'] == 12
  rows = {r['step']: r for r in metrics(str(tmp_path)) if 'train/loss' in r}
  assert [s for s, r in rows.items() if r.get('train/skipped_updates')] == [5, 9]
  assert all(np.isfinite(r['train/loss']) for r in rows.values())
  saved = saved_checkpoints(str(tmp_path))
  assert all(all_finite(state) for state, _ in saved.values())
  # A skipped step leaves parameters and optimizer state exactly as they were: the checkpoints
  # after steps 4 and 5 differ only in the step counter.
  (before, _), (after, _) = saved[4], saved[5]
  assert int(after['step']) == int(before['step']) + 1 == 5
  assert ckpt.digest(after['params']) == ckpt.digest(before['params'])
  assert ckpt.digest(after['opt_state']) == ckpt.digest(before['opt_state'])
  assert ckpt.digest(saved[6][0]['params']) != ckpt.digest(after['params'])  # step 6 trains


def test_nonfinite_skip_halts_after_k_in_a_row(monkeypatch, tmp_path):
  poison(monkeypatch, steps=[5, 6, 7])
  with pytest.raises(train.TrainingHalted, match=r'step 7: .*3 in a row'):
    train.train_and_evaluate(config(nonfinite='skip', max_nonfinite_in_a_row=3), str(tmp_path))
  assert all(all_finite(state) for state, _ in saved_checkpoints(str(tmp_path)).values())


def test_early_stopping_keeps_and_reports_the_best(monkeypatch, tmp_path, caplog):
  """Scripted eval losses: best at the 2nd eval (step 4), then two evals without improvement
  stop the run at step 8 with patience 2; the best checkpoint survives keep=1."""
  script = iter([5.0, 4.0, 4.5, 4.2, 3.0, 2.0])
  monkeypatch.setattr(train.Trainer, 'evaluate',
                      lambda self, params, batches: {'eval/loss': next(script)})
  c = config(eval_every=2, early_stopping_patience=2)
  c.checkpoint.update(keep=1, keep_best=1)
  with caplog.at_level(logging.INFO):
    out = train.train_and_evaluate(c, str(tmp_path))
  assert out['step'] == 8 and out['best_step'] == 4
  steps = sorted(int(n) for n in os.listdir(tmp_path / 'checkpoints') if n.isdigit())
  assert steps == [4, 8]  # the newest (keep=1) and the best (keep_best=1)
  _, _, meta = ckpt.read_checkpoint(str(tmp_path / 'checkpoints'), 8)
  assert meta['early_stopping'] == {'best': 4.0, 'best_step': 4, 'bad_evals': 2}
  text = caplog.text
  assert 'early stopping at step 8' in text and 'best eval/loss = 4 at step 4' in text


def test_grad_norm_warning_fires_only_above_the_threshold(tmp_path, caplog):
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(config(steps=2, grad_norm_warn=1e-6), str(tmp_path / 'low'))
  warned = [r.getMessage() for r in caplog.records if 'grad_norm_warn' in r.getMessage()]
  assert len(warned) == 2 and warned[0].startswith('step 1: gradient norm'), warned
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(config(steps=2, grad_norm_warn=1e6), str(tmp_path / 'high'))
  assert not [r for r in caplog.records if 'grad_norm_warn' in r.getMessage()]
