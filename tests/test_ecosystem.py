"""Ecosystem tools: HF export/import, predict, plots, sweep, W&B writer.

Optional packages (torch, transformers, safetensors, matplotlib, optuna) are skipped cleanly when
missing. One tiny run, trained for 4 steps, is shared by the module.
"""
import json
import os
import subprocess
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from mlm_jax import checkpoint as ckpt
from mlm_jax import data
from mlm_jax import model as model_lib
from mlm_jax import predict
from mlm_jax import rundir
from mlm_jax import train
from mlm_jax import wandb_writer
from mlm_jax.errors import ConfigError
from tests.conftest import need
from tests.test_resume import tiny
from tools import export_hf, import_hf, plot_metrics, plot_schedule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """The tiny run of test_resume (12 steps, evals at 6 and 12): the same compiled programs."""
  workdir = str(tmp_path_factory.mktemp('run'))
  train.train_and_evaluate(tiny(), workdir)
  return workdir


def best_eval_step(workdir):
  losses = rundir.read_metrics(workdir)['eval/loss']
  return losses[0][int(np.argmin(losses[1]))]


def init_run(workdir, tokenizer='char', extra=None, layer_norm='post'):
  """An untrained run directory with random parameters (numpy: nothing to compile but the digest)."""
  c = tiny()
  c.model.update(layer_norm=layer_norm, dtype='float32')
  if tokenizer == 'char':
    tok = data.CharTokenizer(c.data.alphabet)
    c.data.tokenizer = 'char'
    c.model.vocab_size = tok.vocab_size
  else:
    tok = data.build_tokenizer(c)
  c.model.extra_embeddings = ml_collections.ConfigDict(extra or {})
  config = c.to_dict()
  cfg = model_lib.BertConfig.from_config(c.model, 'float32')
  _, abstract = nnx.split(nnx.eval_shape(lambda: model_lib.Bert(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (("'scale'" in jax.tree_util.keystr(path)) + 0.1 * rng.standard_normal(
          x.shape)).astype(np.float32), abstract)
  with ckpt.Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False) as saver:
    saver.save(0, {'step': np.zeros((), np.int32), 'params': params}, metadata={'config': config},
               force=True)
  tok.save(os.path.join(workdir, 'tokenizer'))
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config, f)
  return workdir


def jitted_model(cfg, params):
  graphdef, state = nnx.split(rundir.make_model(cfg, params))
  apply = jax.jit(lambda state, batch: nnx.merge(graphdef, state)(batch))
  return lambda batch: np.asarray(apply(state, batch))


def perturbed(params, scale=0.1, seed=0):
  """Every parameter moved by noise, so LayerNorms and biases are not their trivial init values."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (x + scale * rng.standard_normal(x.shape)).astype(np.float32), params)


def padded_batch(predictor, texts):
  batch, _ = predictor.batch(texts)
  return batch


def packed_batch(predictor, texts, length):
  """Two records per row: positions restart and segment ids tell them apart."""
  ids = [predictor.encode(t) for t in texts]
  input_ids = np.full((1, length), predictor.tokenizer.pad_id, np.int32)
  segment_ids, positions = np.zeros((1, length), np.int32), np.zeros((1, length), np.int32)
  start = 0
  for k, x in enumerate(ids):
    input_ids[0, start:start + len(x)] = x
    segment_ids[0, start:start + len(x)] = k + 1
    positions[0, start:start + len(x)] = np.arange(len(x))
    start += len(x)
  mlm_positions = np.flatnonzero(input_ids[0] == predictor.tokenizer.mask_id)[None].astype(np.int32)
  return {'input_ids': input_ids, 'segment_ids': segment_ids, 'positions': positions,
          'token_type_ids': np.zeros_like(input_ids), 'mlm_positions': mlm_positions}


def hf_logits(hf_model, batch, packed=False):
  import torch
  seg = batch['segment_ids']
  if packed:  # a 4-D mask: attend within the same record only
    mask = torch.tensor((seg[:, :, None] == seg[:, None, :])[:, None])
  else:
    mask = torch.tensor(seg > 0, dtype=torch.long)
  with torch.no_grad():
    out = hf_model(input_ids=torch.tensor(batch['input_ids']).long(), attention_mask=mask,
                   token_type_ids=torch.tensor(batch['token_type_ids']).long(),
                   position_ids=torch.tensor(batch['positions']).long()).logits.numpy()
  return np.take_along_axis(out, batch['mlm_positions'][..., None], axis=1)


TEXTS = ['the king [MASK] to the tower , my lord .', 'o [MASK] , [MASK] !']


def test_hf_export_matches_ours_on_padded_and_packed_input(run_dir, tmp_path):
  need('safetensors')
  need('torch')
  transformers = need('transformers')
  from safetensors.numpy import save_file

  predictor = predict.Predictor(run_dir)
  params = perturbed(rundir.load(run_dir).params)
  out = str(tmp_path / 'hf')
  os.makedirs(out)
  save_file(export_hf.hf_state_dict(params, predictor.config), os.path.join(out, 'model.safetensors'))
  with open(os.path.join(out, 'config.json'), 'w') as f:
    json.dump(export_hf.hf_config(predictor.config), f)
  hf_model, info = transformers.BertForMaskedLM.from_pretrained(out, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys']
  hf_model.eval()
  ours = jitted_model(predictor.cfg, params)

  batch = padded_batch(predictor, TEXTS)  # rows of different lengths: padding in row 0 or 1
  assert (batch['segment_ids'] == 0).any()
  weights_BP = np.zeros(batch['mlm_positions'].shape, bool)
  for r, text in enumerate(TEXTS):
    weights_BP[r, :text.count('[MASK]')] = True
  diff = np.abs(ours(batch) - hf_logits(hf_model, batch))[weights_BP]
  assert diff.max() < 1e-4, diff.max()

  batch = packed_batch(predictor, TEXTS, predictor.cfg.max_len)
  try:
    theirs = hf_logits(hf_model, batch, packed=True)
  except (TypeError, ValueError, RuntimeError) as e:  # an older transformers without 4-D masks
    pytest.skip(f'this transformers takes no 4-D attention mask: {e}')
  assert np.abs(ours(batch) - theirs).max() < 1e-4


def test_export_cli_then_import_gives_identical_params(run_dir, tmp_path):
  need('safetensors')
  out, imported = str(tmp_path / 'hf'), str(tmp_path / 'imported')
  assert export_hf.main([run_dir, out, '--step', '8']) == 0
  assert {'config.json', 'model.safetensors', 'vocab.txt', 'tokenizer_config.json',
          'special_tokens_map.json'} <= set(os.listdir(out))
  base = tiny()
  import_hf.import_hf(out, imported, base)
  original = rundir.load(run_dir, 8).params
  step, config, _, restored = rundir.load(imported)
  assert step == 0
  assert jax.tree.structure(original) == jax.tree.structure(restored)
  for a, b in zip(jax.tree.leaves(original), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b)
  for field in ('num_layers', 'hidden_size', 'num_heads', 'intermediate_size', 'max_len',
                'vocab_size', 'layer_norm_eps'):
    assert config['model'][field] == base.model[field]
  assert config['train']['steps'] == base.train.steps  # the rest comes from the given config
  tok = data.load_tokenizer(os.path.join(imported, 'tokenizer'))
  assert tok.pieces == data.load_tokenizer(os.path.join(run_dir, 'tokenizer')).pieces
  assert os.path.exists(os.path.join(imported, 'import_config.py'))

  transformers = need('transformers')  # the exported tokenizer files
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  text = 'O Romeo, Romeo! wherefore art thou Romeo? Café'
  assert hf_tok(text)['input_ids'] == predict.Predictor(run_dir).encode(text).tolist()


def test_import_of_a_model_written_by_transformers(tmp_path):
  need('safetensors')
  torch = need('torch')
  transformers = need('transformers')
  hf_dir, imported = str(tmp_path / 'hf'), str(tmp_path / 'imported')
  c = tiny()
  hf_config = transformers.BertConfig(
      vocab_size=c.model.vocab_size, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
      intermediate_size=40, max_position_embeddings=48, layer_norm_eps=1e-7)
  torch.manual_seed(0)
  hf_model = transformers.BertForMaskedLM(hf_config).eval()
  with torch.no_grad():
    for p in hf_model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  hf_model.save_pretrained(hf_dir)
  with open(data.config.expand_path(c.data.vocab_path)) as src, open(f'{hf_dir}/vocab.txt', 'w') as dst:
    dst.write(src.read())
  result = import_hf.import_hf(hf_dir, imported, c, max_len=32)
  assert result['warnings'] == []
  m = result['config']['model']
  assert (m['hidden_size'], m['num_layers'], m['num_heads'], m['max_len']) == (24, 2, 3, 32)
  assert m['layer_norm_eps'] == 1e-7
  predictor = predict.Predictor(imported)
  batch = padded_batch(predictor, TEXTS)
  diff = np.abs(predictor.logits(batch) - hf_logits(hf_model, batch))[:, :1]  # first [MASK] of each
  assert diff.max() < 1e-4, diff.max()


@pytest.mark.slow
def test_imported_run_continues_pretraining(run_dir, tmp_path):
  need('safetensors')
  out, imported = str(tmp_path / 'hf'), str(tmp_path / 'imported')
  export_hf.export(run_dir, out)
  import_hf.import_hf(out, imported, tiny())
  sys.path.insert(0, imported)
  try:
    config = __import__('import_config').get_config()
  finally:
    sys.path.remove(imported)
  last = train.train_and_evaluate(config, imported, stop_after=2)
  assert last['step'] == 2 and np.isfinite(last['train/loss'])


def test_export_refuses_what_bert_cannot_express(tmp_path):
  config = {'model': {'layer_norm': 'pre', 'extra_embeddings': {}}}
  with pytest.raises(export_hf.ExportError, match='post-LN'):
    export_hf.check_exportable(config)
  # Extra embeddings fold into token types (tests/test_export.py), unless the combinations are too many.
  config = {'model': {'layer_norm': 'post', 'type_vocab_size': 2,
                      'extra_embeddings': {'tld': 512, 'asn': 1000}}}
  with pytest.raises(export_hf.ExportError, match='--drop_extra_embeddings'):
    export_hf.check_exportable(config)
  assert 'differ' in export_hf.check_exportable(config, drop_extra_embeddings=True)[0]
  workdir = init_run(str(tmp_path / 'pre'), tokenizer='wordpiece', layer_norm='pre')
  assert export_hf.main([workdir, str(tmp_path / 'out')]) == 2
  assert not os.path.exists(tmp_path / 'out')


def test_export_drops_extra_embeddings_when_asked(tmp_path):
  need('safetensors')
  workdir = init_run(str(tmp_path / 'run'), extra={'tld': 7})
  result = export_hf.export(workdir, str(tmp_path / 'out'), drop_extra_embeddings=True)
  assert len(result['warnings']) == 1  # outputs differ (the char tokenizer: tokenizer.json)
  from safetensors.numpy import load_file
  keys = load_file(str(tmp_path / 'out' / 'model.safetensors')).keys()
  assert not any('extra' in k or 'tld' in k for k in keys)
  assert 'vocab.txt' not in os.listdir(tmp_path / 'out')


def test_predict_returns_top_k_probabilities(run_dir):
  predictor = predict.Predictor(run_dir)
  assert predictor.step == best_eval_step(run_dir)  # the default: the best checkpoint
  results = predictor.predict(TEXTS, top_k=3)
  assert [len(r) for r in results] == [1, 2]  # one list per [MASK]
  for per_mask in results:
    for preds in per_mask:
      probs = [p for _, p in preds]
      assert len(preds) == 3 and probs == sorted(probs, reverse=True)
      assert 0 < sum(probs) <= 1 + 1e-6
  assert results != predict.Predictor(run_dir, step=4).predict(TEXTS, top_k=3)


def test_predict_char_model_with_extra_feature(tmp_path):
  workdir = init_run(str(tmp_path / 'run'), extra={'tld': 7})
  predictor = predict.Predictor(workdir)
  batch, slots = predictor.batch(['exam[MASK]le.com'], {'tld': 3})
  assert len(slots[0]) == 1 and batch['input_ids'][0, slots[0][0]] == predictor.tokenizer.mask_id
  assert batch['input_ids'].shape[1] == len('examle.com') + 3  # [CLS] + chars + [MASK] + [SEP]
  assert set(np.unique(batch['tld'])) == {3}
  (preds,), = predictor.predict(['exam[MASK]le.com'], top_k=4, features={'tld': 3})
  assert len(preds) == 4 and all(len(t) in (1, 5, 6) for t, _ in preds)  # a char or a [SPECIAL]
  default = predictor.predict(['exam[MASK]le.com'], top_k=4)
  assert default != [[preds]]  # the feature changes the prediction (tld 0 by default)
  with pytest.raises(ValueError, match='unknown --feature'):
    predictor.batch(['a[MASK]'], {'asn': 1})
  with pytest.raises(ValueError, match='outside'):
    predictor.batch(['a[MASK]'], {'tld': 7})
  with pytest.raises(ValueError, match=r'\[MASK\]'):
    predictor.batch(['no mask here'])


def test_predict_cli(run_dir):
  proc = subprocess.run([sys.executable, '-m', 'mlm_jax.predict', f'--workdir={run_dir}', '--top_k=2',
                         'the king [MASK] to the tower .'], cwd=REPO, env=ENV, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  assert lines[0] == f'step {best_eval_step(run_dir)}' and lines[2].startswith('  [MASK] #1: ')


def _is_png(path):
  with open(path, 'rb') as f:
    return os.path.getsize(path) > 1000 and f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_plot_metrics_writes_a_png(run_dir, tmp_path):
  need('matplotlib')
  out = str(tmp_path / 'metrics.png')
  assert plot_metrics.main([run_dir, '--out', out]) == 0
  assert _is_png(out)
  series = rundir.read_metrics(run_dir)
  assert series['eval/loss'][0] == [6, 12] and len(series['train/loss'][0]) == 12


def test_plot_schedule_dry_run(tmp_path):
  need('matplotlib')
  c = tiny()
  c.train.steps = 1000
  c.optimizer.update(warmup_steps=50, schedule='linear', end_lr_ratio=0.0)
  report = plot_schedule.report(c)
  assert 'step      50 (end of warmup): lr 0.002\n' in report
  assert 'step     999 (last): lr 2.105e-06' in report  # 0.002 / 950: linear to 0 at step 1000
  steps, lrs = plot_schedule.schedule_values(c)
  assert steps[0] == 0 and steps[-1] == 999 and lrs[0] == 0.0
  assert np.isclose(lrs.max(), c.optimizer.learning_rate)
  out = plot_schedule.plot(c, str(tmp_path / 'schedule.png'))
  assert _is_png(out)


def test_sweep_suggestions_make_valid_configs(tmp_path):
  optuna = need('optuna')
  from mlm_jax import config as config_lib
  from tools import sweep
  base = tiny()
  study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))

  def objective(trial):
    config = sweep.trial_config(base, sweep.suggest(trial, base, (1e-4, 1e-2)), 40, 4)
    config_lib.validate(config)
    assert config.train.eval_every == 10 and config.train.steps == 40
    return config.optimizer.learning_rate

  study.optimize(objective, n_trials=5)
  rows = sweep.summary(study)
  assert [r['eval_loss'] for r in rows] == sorted(r['eval_loss'] for r in rows)
  table = sweep.format_table(rows)
  assert len(table.splitlines()) == 7 and 'learning_rate' in table


@pytest.mark.slow
def test_sweep_two_trials_on_a_tiny_config(tmp_path):
  need('optuna')
  from tools import sweep
  workdir = str(tmp_path)
  study = sweep.sweep(tiny(), workdir, trials=2, steps=4, evals=2)
  assert len(study.trials) == 2
  for t in study.trials:
    assert t.state.name == 'COMPLETE' and np.isfinite(t.value)
    assert sorted(t.intermediate_values) == [2, 4]  # reported after the slice and at the end
    assert os.path.exists(os.path.join(workdir, f'trial_{t.number}', 'metrics.jsonl'))
  rows = json.load(open(os.path.join(workdir, 'sweep_summary.json')))
  assert len(rows) == 2 and rows[0]['eval_loss'] <= rows[1]['eval_loss']


class _FakeRun:
  def __init__(self):
    self.logged, self.metrics, self.finished = [], [], False

  def define_metric(self, name, step_metric=None):
    self.metrics.append((name, step_metric))

  def log(self, values):
    self.logged.append(values)

  def finish(self):
    self.finished = True


def test_wandb_writer_logs_with_our_step_and_keeps_its_run_id(tmp_path, monkeypatch):
  assert wandb_writer.make_writer('', str(tmp_path)) is None
  monkeypatch.setitem(sys.modules, 'wandb', None)  # not installed
  with pytest.raises(ConfigError, match='train.wandb_project'):
    wandb_writer.make_writer('proj', str(tmp_path))
  inits = []

  def init(**kw):
    inits.append(kw)
    return _FakeRun()

  ids = iter(['abc123', 'zzz999'])
  fake = types.SimpleNamespace(init=init, util=types.SimpleNamespace(generate_id=lambda: next(ids)))
  monkeypatch.setitem(sys.modules, 'wandb', fake)
  writer = wandb_writer.make_writer('proj', str(tmp_path), {'seed': 0})
  writer.write(10, {'train/loss': np.float32(2.5)})
  run = writer.run
  writer.close()
  assert run.logged == [{'trainer/step': 10, 'train/loss': 2.5}] and run.finished
  assert ('*', 'trainer/step') in run.metrics
  wandb_writer.make_writer('proj', str(tmp_path)).close()  # a resumed run: same W&B run
  assert [kw['id'] for kw in inits] == ['abc123', 'abc123']
  assert inits[0]['project'] == 'proj' and inits[0]['resume'] == 'allow'
