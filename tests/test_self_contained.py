"""Self-contained checkpoints: each saved step holds its resolved config (metadata) and its tokenizer
(the 'tokenizer' item), so one step directory copied anywhere, with the run directory gone, gives
what the intact run gives through evaluate, predict and export_hf. Steps saved before the tokenizer
item existed still work through their run directory."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from mlm_jax import checkpoint as ckpt
from mlm_jax import data, rundir, train
from tests.test_resume import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VALID = os.path.join(REPO, 'mlm_jax', 'assets', 'shakespeare', 'valid.txt')
TEXT = 'the king [MASK] to the tower , and [MASK] the queen .'
# The quick-start model, small, trained hard enough that its predictions are far from uniform.
TRAIN = ['--config=configs/quickstart.py', '--config.model.num_layers=1',
         '--config.model.hidden_size=32', '--config.model.num_heads=2',
         '--config.model.intermediate_size=64', '--config.model.max_len=32',
         '--config.train.steps=30', '--config.train.batch_size=8', '--config.train.eval_every=10',
         '--config.train.eval_steps=1', '--config.train.progress_bar=false',
         '--config.train.compilation_cache_dir=', '--config.optimizer.learning_rate=0.01',
         '--config.optimizer.warmup_steps=2', '--config.checkpoint.every=10',
         '--config.checkpoint.keep=3']
STEP = 20  # not the newest: the step directory, not "latest", decides


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def _tool_outputs(where: list[str], export_where: list[str], out_dir) -> dict:
  """evaluate's RESULT line, predict's top-k and export_hf's files, for `where` (the flags naming
  the checkpoint) and `export_where` (export_hf's arguments before OUT)."""
  result = _cli('-m', 'mlm_jax.evaluate', *where, f'--files={VALID}').strip().splitlines()[-1]
  predicted = _cli('-m', 'mlm_jax.predict', *where, '--top_k=8', TEXT)
  _cli('tools/export_hf.py', *export_where, str(out_dir))
  files = {name: (out_dir / name).read_bytes() for name in sorted(os.listdir(out_dir))}
  return {'evaluate': result, 'predict': predicted, 'export': files}


def test_a_copied_step_gives_what_the_intact_run_gives(tmp_path):
  run = tmp_path / 'run'
  _cli('-m', 'mlm_jax.main', f'--workdir={run}', *TRAIN)
  intact = _tool_outputs([f'--workdir={run}', f'--step={STEP}'], [str(run), f'--step={STEP}'],
                         tmp_path / 'hf_intact')
  elsewhere = tmp_path / 'elsewhere' / str(STEP)
  shutil.copytree(run / 'checkpoints' / str(STEP), elsewhere)
  shutil.rmtree(run)
  alone = _tool_outputs([f'--checkpoint={elsewhere}'], [f'--checkpoint={elsewhere}'],
                        tmp_path / 'hf_alone')
  assert alone == intact
  # The outputs say something: a real evaluation, confident distinct predictions, BERT files.
  assert intact['evaluate'].startswith('RESULT loss=') and 'records=' in intact['evaluate']
  assert intact['predict'].startswith(f'step {STEP}\n')
  first_mask = intact['predict'].splitlines()[2]
  probs = [float(p) for p in first_mask.split()[3::2]]
  assert len(probs) == 8 and probs == sorted(probs, reverse=True) and probs[0] > 1.5 * probs[-1]
  assert {'config.json', 'model.safetensors', 'vocab.txt'} <= set(intact['export'])


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run'))
  c = tiny()
  c.train.update(steps=4, eval_every=4)
  c.checkpoint.update(every=2, keep=5)
  train.train_and_evaluate(c, workdir)
  return workdir


def test_the_step_s_own_tokenizer_and_config_win_over_the_run_directory(run_dir, tmp_path):
  copy = tmp_path / 'run'
  shutil.copytree(run_dir, copy)
  expected = rundir.load(run_dir, 2)
  # The run directory's tokenizer gone and its config.json changed (as a resume with another
  # eval_every rewrites it): step 2 still reads back its own.
  shutil.rmtree(copy / 'tokenizer')
  config = json.loads((copy / 'config.json').read_text())
  config['train']['eval_every'] = 1234
  (copy / 'config.json').write_text(json.dumps(config))
  got = rundir.load(str(copy), 2)
  assert got.config == expected.config and got.config['train']['eval_every'] == 4
  assert got.tokenizer.pieces == expected.tokenizer.pieces
  assert got.tokenizer.fingerprint() == data.load_tokenizer(
      os.path.join(run_dir, 'tokenizer')).fingerprint()


def test_a_step_saved_without_its_tokenizer_reads_the_run_s(run_dir, tmp_path):
  """A step written before the tokenizer item existed: state and metadata only."""
  _, state, meta = ckpt.read_checkpoint(os.path.join(run_dir, 'checkpoints'), 4)
  old = tmp_path / 'old'
  with ckpt.Checkpointer(str(old / 'checkpoints'), async_save=False) as checkpointer:
    checkpointer.save(4, state, metadata={k: v for k, v in meta.items()
                                          if k not in ckpt._RESERVED_META}, force=True)
  step_dir = old / 'checkpoints' / '4'
  assert not (step_dir / ckpt.TOKENIZER).exists()
  shutil.copytree(os.path.join(run_dir, 'tokenizer'), old / 'tokenizer')
  shutil.copy(os.path.join(run_dir, 'config.json'), old / 'config.json')
  got, expected = rundir.load(str(old)), rundir.load(run_dir, 4)
  assert got.step == 4 and got.config == expected.config
  assert got.tokenizer.pieces == expected.tokenizer.pieces
  assert jax.tree.structure(got.params) == jax.tree.structure(expected.params)
  for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(expected.params)):
    np.testing.assert_array_equal(a, b)
  # Out of its run directory, such a step says where its tokenizer is.
  alone = tmp_path / 'alone' / '4'
  shutil.copytree(step_dir, alone)
  with pytest.raises(ckpt.CheckpointError, match="saved without its tokenizer.*run's tokenizer/"):
    rundir.load(str(alone))


def _tokenizer_of(name, variant=''):
  from tests.test_workloads import load_config
  return data.build_tokenizer(load_config(name, variant) if variant else load_config(name))


@pytest.mark.parametrize('name', ['quickstart', 'domainbert:tiny', 'event_bert', 'char'])
def test_every_tokenizer_kind_survives_the_checkpoint_round_trip(name, tmp_path):
  """Files of every kind (WordPiece vocab, TLD vocabulary, event types + vocab, alphabet) are saved
  in a step and read back into a tokenizer that writes the same files and encodes alike."""
  if name == 'char':
    tok = data.tokenizers.CharTokenizer('abc .', lowercase=False)
  else:
    tok = _tokenizer_of(*name.split(':'))
  files = rundir.tokenizer_files(tok)
  with ckpt.Checkpointer(str(tmp_path / 'checkpoints'), async_save=False) as checkpointer:
    checkpointer.save(1, {'x': np.zeros(2, np.float32)}, metadata={}, tokenizer=files, force=True)
    assert checkpointer.tokenizer(1) == files
  back = rundir.tokenizer_from_files(files)
  assert type(back) is type(tok) and rundir.tokenizer_files(back) == files
  assert back.vocab_size == tok.vocab_size
  assert back.special_ids.tolist() == tok.special_ids.tolist()
  texts = ['the cab', 'Abc . cab', 'example.co.uk']
  for a, b in zip(back.encode_batch(texts), tok.encode_batch(texts)):
    assert a.tolist() == b.tolist()
  if hasattr(tok, 'tlds'):
    assert back.tlds == tok.tlds and len(tok.tlds) > 10


def test_tokenizer_file_names_cannot_leave_their_directory():
  for name in ('../vocab.txt', 'a/b', '.', ''):
    with pytest.raises(ckpt.CheckpointError, match='not a plain name'):
      rundir.tokenizer_from_files({name: 'x'})
