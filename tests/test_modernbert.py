"""model.arch='modernbert': transformers' ModernBertForMaskedLM, both ways, and the trainer's
properties (packing, window, scan/remat, bf16, FSDP, exact resume, fill-mask after export).

One small shape is used throughout: 4 layers (global 0 and 3, local 1 and 2 with the default
every-third pattern), hidden 32, 4 heads, GeGLU 48, sequences of 64 and a window of 16 (±8), so
every sequence is longer than the window.
"""
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import modernbert_base
from mlm_jax import checkpoint as ckpt
from mlm_jax import config as config_lib
from mlm_jax import data
from mlm_jax import model as model_lib
from mlm_jax import modernbert
from mlm_jax import predict
from mlm_jax import train
from tests import test_train_step
from tests.conftest import need
from tests.test_resume import final_digest, losses
from tools import export_hf, import_hf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L, WINDOW = 64, 16
SHAPE = dict(num_layers=4, hidden_size=32, num_heads=4, intermediate_size=48, max_len=L,
             local_attention=WINDOW)


def tiny_config(**model):
  """configs/modernbert_base.py:tiny at SHAPE (the shipped 2,048-piece vocabulary)."""
  c = modernbert_base.get_config('tiny')
  c.model.update(**SHAPE)
  c.model.update(**model)
  c.train.update(progress_bar=False, compilation_cache_dir='')
  return c


def model_cfg(dtype='float32', **fields):
  c = tiny_config()
  c.model.vocab_size = 97
  return dataclasses.replace(model_lib.BertConfig.from_config(c.model, dtype), **fields)


def random_params(cfg, seed=0, scale=0.2):
  """Our initialised params moved by noise (norm scales off 1, the head bias off 0): nested dict."""
  _, state = nnx.split(nnx.eval_shape(lambda: model_lib.build(cfg, nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: (("'scale'" in jax.tree_util.keystr(path))
                       + scale * rng.standard_normal(x.shape)).astype(np.float32),
      nnx.to_pure_dict(state))


def forward(cfg, params):
  """jitted (batch, dropout_key) -> logits of our model holding `params`."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: model_lib.build(cfg, nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return jax.jit(lambda batch, key=None: nnx.merge(graphdef, state)(batch, key))


def row_batch(ids_BL, lengths):
  """Rows of one record each (the first lengths[r] tokens), every position a prediction slot."""
  b, l = ids_BL.shape
  seg = (np.arange(l)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  return {'input_ids': np.where(seg > 0, ids_BL, 0).astype(np.int32), 'segment_ids': seg,
          'positions': np.where(seg > 0, np.arange(l)[None], 0).astype(np.int32),
          'token_type_ids': np.zeros((b, l), np.int32),
          'mlm_positions': np.tile(np.arange(l, dtype=np.int32), (b, 1))}


def hf_logits(hf_model, batch):
  torch = need('torch')
  with torch.no_grad():
    out = hf_model(input_ids=torch.tensor(batch['input_ids']).long(),
                   attention_mask=torch.tensor(batch['segment_ids'] > 0).long()).logits.numpy()
  return np.take_along_axis(out, batch['mlm_positions'][..., None], axis=1)


# --- the pieces, by hand --------------------------------------------------------------------------

def test_window_mask_is_the_brute_force_one():
  seg = np.array([[1] * 20 + [2] * 30 + [0] * 14, [1] * 64])
  global_mask, local_mask = (np.asarray(m) for m in modernbert.attention_masks(jnp.asarray(seg), 16))
  want_global = np.zeros((2, 1, 64, 64), bool)
  want_local = np.zeros((2, 1, 64, 64), bool)
  for b in range(2):
    for i in range(64):
      for j in range(64):
        same = seg[b, i] == seg[b, j]
        want_global[b, 0, i, j] = same
        want_local[b, 0, i, j] = same and -8 <= i - j <= 8
  np.testing.assert_array_equal(global_mask, want_global)
  np.testing.assert_array_equal(local_mask, want_local)
  assert local_mask[1, 0, 30].sum() == 17  # ±8 and itself


def test_rotary_rotates_pairs_half_a_head_apart():
  # D = 4, theta = 100: frequencies 1 and 100^(-1/2) = 0.1; x = e0 + 2 e3 at position 2 turns the
  # pair (0, 2) by 2 rad and the pair (1, 3) by 0.2 rad.
  cos, sin = modernbert.rotary_tables(jnp.array([[2]]), 4, 100.0)
  got = np.asarray(modernbert.apply_rotary(jnp.array([[[[1.0, 0.0, 0.0, 2.0]]]]), cos, sin))[0, 0, 0]
  want = [math.cos(2), -2 * math.sin(0.2), math.sin(2), 2 * math.cos(0.2)]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_layer_pattern_init_and_parameter_shapes():
  cfg = model_cfg()
  assert [modernbert.is_global(i, 3) for i in range(7)] == [True, False, False, True, False, False,
                                                             True]
  model = model_lib.build(cfg, nnx.Rngs(0))
  p = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  assert p['blocks']['attn_norm']['scale'].shape == (3, 32)  # layer 0 has none
  assert p['blocks']['ff_in']['kernel'].shape == (4, 32, 96)  # [GELU input | gate]
  assert not any('bias' in k for k in p['blocks']) and set(p['head']) == {'dense', 'norm', 'bias'}
  std_out = 0.02 / math.sqrt(2 * 4)
  for leaf, std in ((p['embeddings']['word']['embedding'], 0.02), (p['blocks']['qkv']['kernel'], 0.02),
                    (p['blocks']['attn_out']['kernel'], std_out), (p['head']['dense']['kernel'], std_out)):
    assert np.abs(leaf).max() <= 2 * std * (1 + 1e-6)  # cut at 2 std, as torch's trunc_normal_
    assert 0.8 * std < leaf.std() < 0.95 * std  # a normal cut at ±2σ keeps 88% of its std
  flops = model_lib.model_flops_per_token(cfg, 1000, 0.0)
  # Layers 0 and 3 score 64 keys, layers 1 and 2 the 17 of their window.
  assert flops == 6 * 1000 + 12 * 32 * (2 * 64 + 2 * 17)


def test_config_checks_name_the_field():
  from mlm_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  for field, value, match in (('layer_norm', 'post', 'model.layer_norm'),
                              ('local_attention', 15, 'model.local_attention'),
                              ('global_attn_every_n_layers', 0, 'model.global_attn_every_n_layers'),
                              ('arch', 'gpt', 'model.arch')):
    c = tiny_config()
    c.model[field] = value
    with pytest.raises(ConfigError, match=match):
      config_lib.validate(c)
  config_lib.validate(tiny_config())


# --- the model's properties ------------------------------------------------------------------------

def test_packed_records_give_each_record_s_own_logits():
  """Two records in one row (positions restarting, the window inside each record) = each alone.
  (Rotary scores depend on position differences only, so a restart is invisible but for float
  rounding; what this checks is the segment mask and the window staying inside its record.)"""
  cfg = model_cfg()
  apply = forward(cfg, random_params(cfg))
  rng = np.random.default_rng(1)
  a, b = rng.integers(5, 97, 20), rng.integers(5, 97, 30)
  packed = {'input_ids': np.zeros((1, L), np.int32), 'segment_ids': np.zeros((1, L), np.int32),
            'positions': np.zeros((1, L), np.int32), 'token_type_ids': np.zeros((1, L), np.int32)}
  packed['input_ids'][0, :50] = np.concatenate([a, b])
  packed['segment_ids'][0, :50] = [1] * 20 + [2] * 30
  packed['positions'][0, :50] = np.concatenate([np.arange(20), np.arange(30)])
  packed['mlm_positions'] = np.arange(50, dtype=np.int32)[None]
  together = np.asarray(apply(packed))[0]
  ids = np.zeros((2, L), np.int64)
  ids[0, :20], ids[1, :30] = a, b
  alone = row_batch(ids, [20, 30])
  alone['mlm_positions'] = alone['mlm_positions'][:, :30]
  each = np.asarray(apply(alone))
  np.testing.assert_allclose(together[:20], each[0, :20], atol=2e-5)
  np.testing.assert_allclose(together[20:], each[1, :30], atol=2e-5)
  wide = np.asarray(forward(dataclasses.replace(cfg, local_attention=1024),
                            random_params(cfg))(alone))
  assert np.abs(wide[1, :30] - each[1, :30]).max() > 1e-2  # 30 tokens > the window: it matters


_GRADS = {}


def loss_and_grads(cfg, scale=0.2, key_seed=None):
  """(Σ CE over the slots of one synthetic batch, its gradients) of random_params(cfg, scale) for
  `cfg` (vocabulary 97); dropout keyed by key_seed (None: none). Memoized: tests share the fp32 one."""
  memo = (cfg, scale, key_seed)
  if memo not in _GRADS:
    params = random_params(dataclasses.replace(cfg, dtype='float32'), scale=scale)
    key = None if key_seed is None else jax.random.key(key_seed)
    _GRADS[memo] = _loss_and_grads(cfg, params, _synthetic(), key)
  return _GRADS[memo]


def _loss_and_grads(cfg, params, batch, key):
  graphdef, state = nnx.split(nnx.eval_shape(lambda: model_lib.build(cfg, nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))

  def loss(state):
    logits = nnx.merge(graphdef, state)(batch, key)
    logp = jax.nn.log_softmax(logits)
    return -jnp.sum(jnp.take_along_axis(logp, batch['mlm_targets'][..., None], -1)[..., 0]
                    * batch['mlm_weights'])

  value, grads = jax.jit(jax.value_and_grad(loss))(state)
  return float(value), jax.tree.map(np.asarray, nnx.to_pure_dict(grads))


def _synthetic(seed=0, b=2):
  from mlm_jax.synthetic import random_batch  # pylint: disable=import-outside-toplevel
  return random_batch(seed, b, L, 12, 97)


def test_scan_and_remat_do_not_change_the_numbers():
  """With dropout everywhere (embeddings, GeGLU, attention probabilities and output): scan with
  full remat, and the unrolled loop with save_dots, against the plain loop."""
  base = model_cfg(dropout=0.1, attention_dropout=0.1)
  want_loss, want = loss_and_grads(base, key_seed=3)
  for variant in (dict(scan_layers=True, remat_policy='full'), dict(remat_policy='save_dots')):
    got_loss, got = loss_and_grads(dataclasses.replace(base, **variant), key_seed=3)
    assert got_loss == pytest.approx(want_loss, rel=1e-6), variant
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert np.abs(want['blocks']['attn_norm']['scale']).min() > 0  # layers 1..3 train theirs
  no_dropout, _ = loss_and_grads(model_cfg())
  assert abs(no_dropout - want_loss) > 1e-3  # the key did drop something


def test_bf16_forward_and_backward_are_finite_and_close_to_fp32():
  """bf16 compute (scanned): finite, non-zero gradients, and the fp32 loss to 2%."""
  fp32, _ = loss_and_grads(model_cfg())
  bf16, grads = loss_and_grads(model_cfg(dtype='bfloat16', scan_layers=True))
  assert all(np.isfinite(g).all() and np.abs(g).max() > 0 for g in jax.tree.leaves(grads))
  assert bf16 == pytest.approx(fp32, rel=0.02)


def test_fsdp_sharded_steps_equal_the_replicated_ones():
  """Two steps on the 8 devices, parameters and Adam state sharded 8 ways vs replicated (scanned
  layers 0 global and 1, 2 local; sequences of 32, a window of 8)."""
  model = {'arch': 'modernbert', 'layer_norm': 'pre', 'dropout': 0.1, 'num_layers': 3,
           'max_len': 32, 'local_attention': 8, 'layer_norm_eps': 1e-5, 'scan_layers': True}
  overrides = {f'model.{k}': v for k, v in model.items()}
  config = lambda fsdp: test_train_step.tiny_config(**overrides, **{'sharding.fsdp': fsdp})
  replicated, want, _ = test_train_step.run(config(1), n_steps=2)
  sharded, got, trainer = test_train_step.run(config(8), n_steps=2)
  assert trainer.mesh.shape == {'data': 1, 'fsdp': 8}
  norms = sharded['params']['blocks']['attn_norm']['scale'][...]
  assert norms.shape == (2, 32) and norms.sharding.spec.count('fsdp') == 1
  np.testing.assert_allclose(want, got, atol=1e-5)
  for a, b in zip(jax.tree.leaves(replicated['params']), jax.tree.leaves(sharded['params'])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


# --- transformers -----------------------------------------------------------------------------------

def _write_run(workdir, config, params):
  """A run directory holding `params` at step 0 (nothing compiled)."""
  tok = data.build_tokenizer(config)
  resolved = config.to_dict()
  with ckpt.Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False) as saver:
    saver.save(0, {'step': np.zeros((), np.int32), 'params': params},
               metadata={'config': resolved}, force=True)
  tok.save(os.path.join(workdir, 'tokenizer'))
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(resolved, f)


def _ids_with_padding(seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, 2048, (2, L))
  return row_batch(ids, [L, 41])  # the second row padded


def test_export_loads_in_transformers_with_our_logits(tmp_path):
  need('safetensors')
  transformers = need('transformers')
  config = tiny_config(global_rope_theta=20000.0, local_rope_theta=500.0, layer_norm_eps=1e-6)
  cfg = model_lib.BertConfig.from_config(config.model, 'float32')
  workdir, out = str(tmp_path / 'run'), str(tmp_path / 'hf')
  params = random_params(cfg)
  _write_run(workdir, config, params)
  assert export_hf.main([workdir, out]) == 0
  hf_model, info = transformers.AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
  assert type(hf_model).__name__ == 'ModernBertForMaskedLM'
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
  hc = hf_model.config
  assert hc.sliding_window == WINDOW // 2 and hc.norm_eps == 1e-6
  assert hc.layer_types == ['full_attention', 'sliding_attention', 'sliding_attention',
                            'full_attention']
  assert hc.rope_parameters['full_attention']['rope_theta'] == 20000.0
  assert hc.rope_parameters['sliding_attention']['rope_theta'] == 500.0
  predictor = predict.Predictor(workdir)
  batch = _ids_with_padding()
  ours, theirs = predictor.logits(batch), hf_logits(hf_model.eval(), batch)
  real = batch['segment_ids'] > 0  # transformers' padding positions attend elsewhere
  diff = np.abs(ours - theirs)[real].max()
  print(f'RESULT export max_abs_logit_diff={diff:.3g}')
  assert diff < 1e-4, diff
  assert np.abs(theirs).max() > 1.0  # the logits are not all near zero
  # The same parameters counted both ways: no parameter of either model lacks a counterpart.
  assert hf_model.num_parameters() == sum(x.size for x in jax.tree.leaves(params))


def _hf_model_dir(hf_dir, **config):
  """A ModernBertForMaskedLM written by transformers (every weight moved off its init) + our
  shipped vocab.txt."""
  torch = need('torch')
  transformers = need('transformers')
  hf_config = transformers.ModernBertConfig(
      vocab_size=2048, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
      num_attention_heads=4, max_position_embeddings=L, local_attention=WINDOW, pad_token_id=0,
      cls_token_id=2, sep_token_id=3, bos_token_id=2, eos_token_id=3, **config)
  torch.manual_seed(0)
  hf_model = transformers.ModernBertForMaskedLM(hf_config).eval()
  with torch.no_grad():
    for p in hf_model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  hf_model.save_pretrained(hf_dir)
  shutil.copy(data.config.expand_path('{assets}/shakespeare/vocab.txt'), f'{hf_dir}/vocab.txt')
  return hf_model


def test_import_of_a_model_written_by_transformers_gives_its_logits(tmp_path):
  need('safetensors')
  hf_dir, imported = str(tmp_path / 'hf'), str(tmp_path / 'imported')
  # Every 2nd layer global, other rotary bases: read from layer_types and rope_parameters.
  hf_model = _hf_model_dir(hf_dir, global_attn_every_n_layers=2, norm_eps=1e-6, rope_parameters={
      'full_attention': {'rope_type': 'default', 'rope_theta': 50000.0},
      'sliding_attention': {'rope_type': 'default', 'rope_theta': 300.0}})
  result = import_hf.import_hf(hf_dir, imported, tiny_config())
  assert result['warnings'] == []
  m = result['config']['model']
  assert (m['arch'], m['global_attn_every_n_layers'], m['local_attention']) == ('modernbert', 2, 16)
  assert (m['global_rope_theta'], m['local_rope_theta'], m['layer_norm_eps']) == (50000.0, 300.0,
                                                                                    1e-6)
  batch = _ids_with_padding(1)
  ours, theirs = predict.Predictor(imported).logits(batch), hf_logits(hf_model, batch)
  diff = np.abs(ours - theirs)[batch['segment_ids'] > 0].max()
  print(f'RESULT import max_abs_logit_diff={diff:.3g}')
  assert diff < 1e-4, diff


@pytest.mark.parametrize('num_layers', [4, 1])
def test_state_dict_round_trip(num_layers):
  """Ours -> transformers' names and layouts -> ours is the identity (a 1-layer model's unused
  attention-norm row comes back as ones, its init)."""
  from mlm_jax import hf_modernbert  # pylint: disable=import-outside-toplevel
  cfg = dataclasses.replace(model_cfg(), num_layers=num_layers)
  params = random_params(cfg)
  if num_layers == 1:
    params['blocks']['attn_norm']['scale'][...] = 1.0
  model = dataclasses.asdict(cfg)
  tensors = hf_modernbert.hf_state_dict(params, model)
  assert sum(v.size for v in tensors.values()) == sum(
      x.size for x in jax.tree.leaves(params)) - (32 if num_layers == 1 else 0)
  assert tensors['model.layers.0.attn.Wqkv.weight'].shape == (96, 32)  # torch: [out, in]
  hf = {'num_hidden_layers': num_layers, 'hidden_size': 32, 'vocab_size': 97}
  back, unused = hf_modernbert.our_params(tensors, hf)
  assert unused == []
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)


def test_import_refuses_what_our_model_cannot_express():
  from mlm_jax import hf_modernbert  # pylint: disable=import-outside-toplevel
  base = {'model_type': 'modernbert', 'vocab_size': 10, 'hidden_size': 8, 'num_hidden_layers': 4,
          'num_attention_heads': 2, 'intermediate_size': 8}
  for extra, match in (({'attention_bias': True}, 'attention_bias'),
                       ({'hidden_activation': 'silu'}, 'silu'),
                       ({'layer_types': ['full_attention', 'sliding_attention', 'full_attention',
                                         'full_attention']}, 'every n-th'),
                       ({'rope_parameters': {'full_attention': {'rope_type': 'yarn'}}}, 'yarn'),
                       ({'tie_word_embeddings': False}, 'tied')):
    with pytest.raises(hf_modernbert.HfImportError, match=match):
      hf_modernbert.model_fields({**base, **extra})
  fields, _ = hf_modernbert.model_fields({**base, 'global_attn_every_n_layers': 2,
                                          'global_rope_theta': 1e4, 'local_rope_theta': 99.0})
  assert (fields['global_attn_every_n_layers'], fields['global_rope_theta'],
          fields['local_rope_theta']) == (2, 1e4, 99.0)  # transformers 4's fields


# --- end to end ---------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def hf_started_run(tmp_path_factory):
  """A :tiny run (fsdp 2) whose parameters start from a ModernBertForMaskedLM written by
  transformers (train.init_from), trained 24 steps at a high learning rate: afterwards its
  predictions are far from uniform, so a top 3 has no near-ties that float noise could reorder."""
  need('safetensors')
  hf_dir = str(tmp_path_factory.mktemp('hf_source'))
  _hf_model_dir(hf_dir)
  c = tiny_config()
  c.train.update(steps=24, init_from=hf_dir, batch_size=16, log_every=1, eval_every=0)
  c.optimizer.update(learning_rate=1e-2, warmup_steps=3)
  c.checkpoint.update(every=24)
  c.sharding.fsdp = 2  # each device takes its slice of the source's arrays
  workdir = str(tmp_path_factory.mktemp('hf_started'))
  train.train_and_evaluate(c, workdir)
  return workdir


def test_a_model_from_transformers_continues_training(hf_started_run):
  run_losses = [loss for _, (loss, _) in sorted(losses(hf_started_run).items())]
  assert len(run_losses) == 24 and all(math.isfinite(x) for x in run_losses)
  assert np.mean(run_losses[-4:]) < run_losses[0] - 0.5, run_losses
  # Step 1 starts from transformers' weights (moved by noise: a loss well above the log V of a fresh
  # init, whose decoder is near zero).
  assert run_losses[0] > math.log(2048) + 0.3, run_losses


FILL = ['the king [MASK] to the tower .', 'o romeo , romeo ! wherefore art [MASK] romeo ?',
        'what is your [MASK] , my good lord ?', 'i [MASK] not what you say .']


def test_exported_tiny_run_fills_masks_as_ours(hf_started_run, tmp_path):
  """The filer's check: a trained :tiny run, exported, in transformers' fill-mask pipeline: the
  same top 3 and probabilities, and the same whole distribution from the loaded model."""
  torch = need('torch')
  transformers = need('transformers')
  workdir, out = hf_started_run, str(tmp_path / 'hf')
  assert export_hf.main([workdir, out]) == 0
  fill = transformers.pipeline('fill-mask', model=out, top_k=3)
  predictor = predict.Predictor(workdir)
  for text, (our_top,) in zip(FILL, predictor.predict(FILL, top_k=3)):
    their = fill(text)
    assert [p['token_str'] for p in their] == [t for t, _ in our_top], text
    np.testing.assert_allclose([p['score'] for p in their], [p for _, p in our_top], atol=1e-5)
  batch, _ = predictor.batch(FILL)
  ours = jax.nn.softmax(predictor.logits(batch), axis=-1)
  inputs = fill.tokenizer(FILL, padding=True, return_tensors='pt')
  assert set(inputs) == {'input_ids', 'attention_mask'}  # no token types for ModernBERT
  np.testing.assert_array_equal(inputs['input_ids'].numpy()[:, :batch['input_ids'].shape[1]],
                                batch['input_ids'])
  with torch.no_grad():
    theirs = torch.softmax(fill.model(**inputs).logits, -1).numpy()
  theirs = np.take_along_axis(theirs, batch['mlm_positions'][..., None], axis=1)
  first_mask = np.asarray(ours)[:, 0]  # one [MASK] per text
  np.testing.assert_allclose(first_mask, theirs[:, 0], atol=1e-6)
  assert np.abs(first_mask[0] - first_mask[1]).max() > 1e-4  # the context changes the guess


def _cli(workdir, *extra):
  cmd = [sys.executable, '-m', 'mlm_jax.main', '--config=configs/modernbert_base.py:tiny',
         f'--workdir={workdir}', '--config.train.steps=12', '--config.train.log_every=1',
         '--config.train.eval_every=6', '--config.checkpoint.every=4',
         '--config.train.progress_bar=false', '--config.train.compilation_cache_dir=', *extra]
  return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'))


@pytest.mark.slow
def test_cli_run_of_the_tiny_config_resumes_bitwise(tmp_path):
  """SIGTERM at step >= 5, the same command again: every step's loss and the final state are
  those of an uninterrupted run."""
  reference, interrupted = str(tmp_path / 'reference'), str(tmp_path / 'interrupted')
  proc = _cli(reference)
  assert proc.wait(timeout=600) == 0, proc.stderr.read()[-2000:]
  proc = _cli(interrupted)
  path = os.path.join(interrupted, 'metrics.jsonl')
  deadline = time.time() + 300
  while not (os.path.exists(path) and any(json.loads(l).get('step', 0) >= 5
                                          for l in open(path) if l.endswith('\n'))):
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  err = proc.communicate(timeout=300)[1]
  assert proc.returncode == 0 and 'preempted' in err, err[-2000:]
  assert final_digest(interrupted)[0] < 12
  proc = _cli(interrupted)
  assert proc.wait(timeout=600) == 0, proc.stderr.read()[-2000:]
  assert losses(interrupted) == losses(reference)
  assert final_digest(interrupted) == final_digest(reference)
