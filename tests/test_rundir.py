"""mlm_jax.rundir: which checkpoint step a run directory means, and reading it back."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from mlm_jax import rundir, train
from mlm_jax.checkpoint import CheckpointError
from tests.test_resume import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """12 steps, a checkpoint every 2 (all kept), evals at 4, 8 and 12: ranked steps 4, 8, 12 and
  unranked ones 2, 6, 10 in between."""
  workdir = str(tmp_path_factory.mktemp('run'))
  c = tiny()
  c.train.update(eval_every=4)
  c.checkpoint.update(every=2, keep=10)
  train.train_and_evaluate(c, workdir)
  return workdir


def eval_losses(workdir):
  """step -> eval/loss, straight from metrics.jsonl."""
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {r['step']: r['eval/loss'] for r in rows if 'eval/loss' in r}


def copy_run(src, dst, steps, best_mode=None):
  """A run directory holding only checkpoint `steps` of `src` (and its config and tokenizer)."""
  os.makedirs(os.path.join(dst, 'checkpoints'))
  for s in steps:
    shutil.copytree(os.path.join(src, 'checkpoints', str(s)),
                    os.path.join(dst, 'checkpoints', str(s)))
  shutil.copytree(os.path.join(src, 'tokenizer'), os.path.join(dst, 'tokenizer'))
  config = json.load(open(os.path.join(src, 'config.json')))
  if best_mode is not None:
    config['checkpoint']['best_mode'] = best_mode
  with open(os.path.join(dst, 'config.json'), 'w') as f:
    json.dump(config, f)
  return dst


def assert_same_params(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_step_choice_follows_the_run_s_best_rule_else_newest(run_dir, tmp_path):
  losses = eval_losses(run_dir)
  assert sorted(losses) == [4, 8, 12]
  assert sorted(int(s) for s in os.listdir(os.path.join(run_dir, 'checkpoints'))) == [
      2, 4, 6, 8, 10, 12]
  run = rundir.resolve(run_dir)
  assert rundir.choose_step(run) == min(losses, key=losses.get)  # best_mode 'min' of the run
  assert rundir.choose_step(run, 6) == 6  # explicit, even an unranked one
  highest = copy_run(run_dir, str(tmp_path / 'max'), [2, 4, 6, 8, 10, 12], best_mode='max')
  assert rundir.choose_step(rundir.resolve(highest)) == max(losses, key=losses.get)
  # The two rules pick different steps here, so the rule (not "newest") made the choice.
  assert min(losses, key=losses.get) != max(losses, key=losses.get)
  # Ranked beats newer: 8 is the only ranked step.
  only_8_ranked = copy_run(run_dir, str(tmp_path / 'b'), [6, 8, 10])
  assert rundir.choose_step(rundir.resolve(only_8_ranked)) == 8
  # Nothing ranked: the newest.
  none_ranked = copy_run(run_dir, str(tmp_path / 'c'), [2, 6, 10])
  assert rundir.choose_step(rundir.resolve(none_ranked)) == 10
  # A step directory means its own step.
  step_dir = rundir.resolve(os.path.join(run_dir, 'checkpoints', '6'))
  assert rundir.choose_step(step_dir) == 6
  with pytest.raises(CheckpointError, match='not step 8'):
    rundir.choose_step(step_dir, 8)


def test_run_dir_and_step_dir_read_the_same_params_and_config(run_dir, tmp_path):
  from_run = rundir.load(run_dir, 6)
  from_step = rundir.load(os.path.join(run_dir, 'checkpoints', '6'))
  assert from_run.step == from_step.step == 6
  saved = json.load(open(os.path.join(run_dir, 'config.json')))
  assert from_run.config == from_step.config == saved
  vocab_size = from_run.config['model']['vocab_size']
  assert from_run.tokenizer.vocab_size == from_step.tokenizer.vocab_size == vocab_size
  assert_same_params(from_run.params, from_step.params)
  step_8 = rundir.load(run_dir, 8).params  # another step is other params: the step was honoured
  assert not np.array_equal(from_run.params['head']['bias'], step_8['head']['bias'])
  # A step directory copied out of its run: the params, and the config recorded in the step.
  alone = str(tmp_path / '6')
  shutil.copytree(os.path.join(run_dir, 'checkpoints', '6'), alone)
  run = rundir.resolve(alone)
  assert run.run is None and rundir.choose_step(run) == 6
  assert_same_params(rundir.read_params(run, 6)[0], from_run.params)
  assert rundir.find_config(run, 6)['model'] == from_run.config['model']
  # The model built from them has the checkpoint's numbers.
  model = rundir.make_model(rundir.model_config(from_run.config), from_run.params)
  np.testing.assert_array_equal(np.asarray(model.head.bias[...]), from_run.params['head']['bias'])


def test_a_missing_run_or_checkpoint_is_a_one_line_error(run_dir, tmp_path):
  with pytest.raises(CheckpointError, match='not found'):
    rundir.load(str(tmp_path / 'nowhere'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(CheckpointError, match='neither a run directory'):
    rundir.load(str(tmp_path / 'empty'))
  (tmp_path / 'fresh' / 'checkpoints').mkdir(parents=True)
  with pytest.raises(CheckpointError, match='No checkpoint in'):
    rundir.load(str(tmp_path / 'fresh'))
  with pytest.raises(CheckpointError, match='No checkpoint step 7'):
    rundir.load(run_dir, 7)
  proc = subprocess.run([sys.executable, '-m', 'mlm_jax.evaluate',
                         f'--workdir={tmp_path / "nowhere"}'], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == f'error: {tmp_path / "nowhere"}: not found'
