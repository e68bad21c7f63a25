"""The batch-size ramp (train.batch_ramp_steps): micro-batches per step as a pure function of the
step, the input cut into whole micro-batches, one compile per count, the loss over the step's own
rows, and exact resume mid-ramp."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mlm_jax import checkpoint as ckpt
from mlm_jax import config as config_lib
from mlm_jax import data
from mlm_jax import steps
from mlm_jax import train
from mlm_jax.errors import ConfigError
from tests import test_cli_failures, test_resume
from tests.test_train_step import batches, make_trainer, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAMP = dict(batch_size=32, grad_accum_steps=4, batch_ramp_steps=6, batch_ramp_start=1)
# k(step) = 1 + floor(3 * step / 6): steps 0-1 one micro-batch of 8 rows, 2-3 two, 4-5 three, then
# all 4.
RAMP_ROWS = [8, 8, 16, 16, 24, 24] + [32] * 6


def ramp_train(**overrides):
  t = config_lib.base_config().train
  t.update(**overrides)
  return t


def test_micro_batches_rule():
  t = ramp_train(grad_accum_steps=4, batch_ramp_steps=6, batch_ramp_start=1)
  assert [steps.micro_batches(t, s) for s in range(9)] == [1, 1, 2, 2, 3, 3, 4, 4, 4]
  # 10 steps shared by the counts 2..7 (6 of them): linear, rounded down; 8 from step 10 on.
  t = ramp_train(grad_accum_steps=8, batch_ramp_steps=10, batch_ramp_start=2)
  assert [steps.micro_batches(t, s) for s in range(12)] == [2, 2, 3, 3, 4, 5, 5, 6, 6, 7, 8, 8]
  off = ramp_train(grad_accum_steps=4, batch_ramp_steps=0, batch_ramp_start=2)
  assert {steps.micro_batches(off, s) for s in range(5)} == {4}


@pytest.mark.parametrize('overrides, field', [
    (dict(batch_ramp_start=0), 'train.batch_ramp_start'),
    (dict(batch_ramp_start=5, grad_accum_steps=4), 'train.batch_ramp_start'),
    (dict(batch_ramp_steps=-1), 'train.batch_ramp_steps'),
    (dict(batch_ramp_steps=10, grad_accum_steps='auto'), 'train.batch_ramp_steps'),
    (dict(batch_ramp_steps=10, grad_accum_steps=4, overfit_one_batch=True),
     'train.batch_ramp_steps'),
])
def test_config_errors_name_the_field(overrides, field):
  c = config_lib.base_config()
  c.train.update(batch_size=32, **overrides)
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c)
  assert e.value.field == field


def test_resume_rules_cover_the_ramp_fields():
  saved = config_lib.base_config().to_dict()
  del saved['train']['batch_ramp_steps'], saved['train']['batch_ramp_start']
  now = config_lib.base_config().to_dict()
  config_lib.validate_resume(saved, now)  # a checkpoint from before the fields: no ramp, as now
  ramped = config_lib.base_config().to_dict()
  ramped['train'].update(batch_ramp_steps=6, grad_accum_steps=4)
  with pytest.raises(ConfigError) as e:
    config_lib.validate_resume(saved, ramped)
  assert e.value.field == 'train.batch_ramp_steps'
  # The start count of a ramp that is off in both is not read: free to change.
  other_start = config_lib.base_config().to_dict()
  other_start['train'].update(batch_ramp_start=3)
  config_lib.validate_resume(now, other_start)
  ramped_2 = json.loads(json.dumps(ramped))
  ramped_2['train']['batch_ramp_start'] = 2
  with pytest.raises(ConfigError, match='train.batch_ramp_start'):
    config_lib.validate_resume(ramped, ramped_2)


def test_cli_refuses_a_ramp_with_auto_accumulation_in_one_line(tmp_path):
  proc = test_cli_failures.cli(tmp_path / 'run', '--config.train.batch_ramp_steps=4',
                               '--config.train.grad_accum_steps=auto')
  test_cli_failures.assert_one_error_line(proc, 'config.train.batch_ramp_steps', "'auto'")
  assert not (tmp_path / 'run').exists()


# ---------------------------------------------------------------------------------------------
# The input: whole micro-batches, every shard's share, any process layout.


@pytest.fixture(scope='module')
def corpus_config():
  c = test_resume.tiny()
  c.train.update(**RAMP)
  c.data.num_shards = 2
  return c, data.build_tokenizer(c)


def test_parts_of_batches_are_the_whole_batches_stream(corpus_config):
  """k of 4 parts from each shard, one after the other, are the rows the whole batches give; the
  input position after them is where those whole batches leave it."""
  c, tok = corpus_config
  whole_it, part_it = data.train_iterator(c, tok), data.train_iterator(c, tok)
  whole = [next(whole_it) for _ in range(3)]  # 96 rows: 48 per shard
  parts = [part_it.next_part(k, 4) for k in (1, 3, 2, 2, 4)]  # 12 micro-batches = 3 batches
  assert [len(p['input_ids']) for p in parts] == [8, 24, 16, 16, 32]
  assert part_it.get_state() == whole_it.get_state()
  for key in whole[0]:
    # Rows [shard 0 | shard 1] in each batch and in each part: compare shard by shard.
    by_shard = lambda bs: [np.concatenate([b[key][s * len(b[key]) // 2:(s + 1) * len(b[key]) // 2]
                                           for b in bs]) for s in (0, 1)]
    for w, p in zip(by_shard(whole), by_shard(parts)):
      np.testing.assert_array_equal(w, p, err_msg=key)
  whole_it.close()
  part_it.close()


def test_parts_do_not_depend_on_the_process_layout(corpus_config):
  """Two processes (one shard each) give the halves of the one-process part."""
  c, tok = corpus_config
  one = data.train_iterator(c, tok)
  two = [data.train_iterator(c, tok, process_index=i, process_count=2) for i in (0, 1)]
  for k in (1, 2, 3):
    single = one.next_part(k, 4)
    halves = [it.next_part(k, 4) for it in two]
    for key in single:
      np.testing.assert_array_equal(single[key], np.concatenate([h[key] for h in halves]))
  for it in [one, *two]:
    it.close()


def test_shards_must_divide_the_micro_batch(corpus_config):
  c, tok = corpus_config
  c = c.copy_and_resolve_references()
  c.data.num_shards = 16  # divides the batch of 32, not its micro-batches of 8
  with pytest.raises(ConfigError, match='data.num_shards'):
    data.train_iterator(c, tok)


# ---------------------------------------------------------------------------------------------
# The step: one compile per count, the loss over the step's own rows.


def test_one_compile_per_count_and_the_loss_denominator_is_the_steps_rows():
  c = tiny_config(**{'train.grad_accum_steps': 4, 'train.batch_ramp_steps': 6})
  trainer = make_trainer(c)
  full = batches(c, 1)[0]
  trainer.compile_steps(full)
  state = trainer.init_state()
  metrics = []
  for rows in (8, 16, 8, 24, 32):
    state, m = trainer.train_step(state, {k: v[:rows] for k, v in full.items()})
    metrics.append(m)
  assert sorted(trainer._ramp_steps) == [1, 2, 3]  # 32 rows: the step compile_steps made
  with pytest.raises(ValueError, match='micro-batches'):
    trainer.train_step(state, {k: v[:12] for k, v in full.items()})
  for rows, m in zip((8, 16, 8, 24, 32), metrics):
    assert float(m['weight_sum']) == full['mlm_weights'][:rows].sum()
    assert float(m['tokens']) == (full['segment_ids'][:rows] > 0).sum()

  # Two micro-batches of a 32-row step == one step on those 16 rows with a 16-row batch: the loss
  # (and so the gradient) is Σ(weight·CE) over the 16 rows / their Σweight, not the full batch's.
  half = {k: v[:16] for k, v in full.items()}
  ramp_state, ramp_m = trainer.train_step(trainer.init_state(), half)
  small_config = tiny_config(**{'train.batch_size': 16})
  small = make_trainer(small_config)
  small.compile_steps(half)
  small_state, small_m = small.train_step(small.init_state(), half)
  assert float(ramp_m['loss_sum']) / float(ramp_m['weight_sum']) == pytest.approx(
      float(small_m['loss_sum']) / float(small_m['weight_sum']), rel=1e-6)
  assert float(ramp_m['grad_norm']) == pytest.approx(float(small_m['grad_norm']), rel=1e-5)
  for a, b in zip(jax.tree.leaves(ramp_state['params']), jax.tree.leaves(small_state['params'])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Whole runs.


def tiny_ramp(**train):
  c = test_resume.tiny()
  c.train.update(**RAMP)
  c.train.update(**train)
  return c


def rows_per_step(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return [r['train/batch_size'] for r in rows if 'train/batch_size' in r]


@pytest.fixture(scope='module')
def ramp_reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('ramp'))
  train.train_and_evaluate(tiny_ramp(), workdir)
  return workdir, test_resume.losses(workdir), test_resume.final_digest(workdir)


def test_a_run_takes_the_ramps_rows_step_by_step(ramp_reference):
  workdir, _, _ = ramp_reference
  assert rows_per_step(workdir) == RAMP_ROWS
  # The input position saved after the last step is that of the rows of all 12 steps (288 = 9
  # whole batches), not of 12 whole batches.
  with ckpt.Checkpointer(os.path.join(workdir, 'checkpoints')) as checkpointer:
    saved = checkpointer.metadata(test_resume.STEPS)['data_state']
  assert sum(RAMP_ROWS) == 9 * 32
  config = tiny_ramp()
  it = data.train_iterator(config, data.build_tokenizer(config))
  for _ in range(9):
    next(it)
  assert saved == it.get_state()
  it.close()


def test_stop_mid_ramp_and_resume_is_bitwise_identical(ramp_reference, tmp_path):
  _, ref_losses, ref_digest = ramp_reference
  workdir = str(tmp_path)
  assert train.train_and_evaluate(tiny_ramp(), workdir, stop_after=3)['step'] == 3  # k 2 of 4
  train.train_and_evaluate(tiny_ramp(), workdir)
  assert test_resume.losses(workdir) == ref_losses
  assert test_resume.final_digest(workdir) == ref_digest
  assert rows_per_step(workdir) == RAMP_ROWS


@pytest.mark.slow
def test_cli_stop_mid_ramp_and_resume_is_bitwise_identical(ramp_reference, tmp_path):
  _, ref_losses, ref_digest = ramp_reference
  workdir = str(tmp_path)
  flags = [f'--config.train.{k}={v}' for k, v in RAMP.items()]
  for extra in (['--stop_after=5'], []):  # 5: the last step with 3 micro-batches
    proc = subprocess.run(
        [sys.executable, '-m', 'mlm_jax.main', '--config=tests/resume_config.py',
         f'--workdir={workdir}', *flags, *extra], cwd=REPO, capture_output=True, text=True,
        env=dict(os.environ, JAX_PLATFORMS='cpu', MLM_JAX_NO_LAUNCH='1'), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
  assert test_resume.losses(workdir) == ref_losses
  assert test_resume.final_digest(workdir) == ref_digest


def test_no_ramp_is_the_run_of_before(tmp_path):
  """batch_ramp_steps=0 takes no ramp path; a ramp that starts at the full count changes nothing
  either: both runs are bitwise the run without a ramp."""
  ref = str(tmp_path / 'off')
  train.train_and_evaluate(tiny_ramp(batch_ramp_steps=0, steps=4), ref)
  degenerate = str(tmp_path / 'full_from_the_start')
  train.train_and_evaluate(tiny_ramp(batch_ramp_start=4, steps=4), degenerate)
  assert test_resume.losses(degenerate) == test_resume.losses(ref)
  assert test_resume.final_digest(degenerate) == test_resume.final_digest(ref)
  assert rows_per_step(ref) == [] and rows_per_step(degenerate) == [32] * 4
