"""Properties of the model and the jitted train step, on synthetic batches."""
import jax
import numpy as np
import pytest

from mlm_jax import config as config_lib
from mlm_jax import optim
from mlm_jax import sharding as shd
from mlm_jax import train
from mlm_jax.synthetic import random_batch


def tiny_config(**overrides):
  c = config_lib.base_config()
  c.model.update(num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64, vocab_size=97,
                 max_len=32, dropout=0.0, dtype='float32')
  c.train.update(batch_size=32, steps=20)
  c.optimizer.update(learning_rate=1e-2, warmup_steps=2)
  for key, value in overrides.items():
    section, field = key.split('.')
    c[section][field] = value
  return c


def make_trainer(config, devices=None):
  return train.Trainer(config, devices=devices)


def fresh(config):
  """(trainer, initial state, one compiled-for batch) for tests that probe a single step."""
  trainer = make_trainer(config)
  batch = batches(config, 1)[0]
  trainer.compile_steps(batch)
  return trainer, trainer.init_state(), batch


def batches(config, n, seed=0):
  p = config_lib.max_predictions(config)
  return [random_batch(seed + i, config.train.batch_size, config.model.max_len, p,
                       config.model.vocab_size) for i in range(n)]


_RUNS = {}


def run(config, n_steps=1, devices=None, seed=0):
  """Trains n_steps on synthetic batches; memoized, since several tests compare against one base."""
  key = (config.to_json(), n_steps, None if devices is None else len(devices), seed)
  if key not in _RUNS:
    _RUNS[key] = _run(config, n_steps, devices, seed)
  return _RUNS[key]


def _run(config, n_steps, devices, seed):
  trainer = make_trainer(config, devices)
  state = trainer.init_state()
  bs = batches(config, n_steps, seed)
  trainer.compile_steps(bs[0])
  losses = []
  for b in bs:
    state, m = trainer.train_step(state, b)
    losses.append(float(m['loss_sum']) / float(m['weight_sum']))
  return state, losses, trainer


def loss_of(trainer, state, batch):
  m = trainer._eval_step(state['params'], shd.global_batch(batch, trainer.mesh))
  return float(m['loss_sum']) / float(m['weight_sum'])


def test_only_masked_slots_affect_the_loss():
  config = tiny_config()
  trainer, state, batch = fresh(config)
  base = loss_of(trainer, state, batch)
  unused = batch['mlm_weights'] == 0
  assert unused.any()
  changed = dict(batch, mlm_targets=np.where(unused, 7, batch['mlm_targets']).astype(np.int32))
  assert loss_of(trainer, state, changed) == pytest.approx(base, abs=1e-7)
  used = dict(batch, mlm_targets=np.where(unused, batch['mlm_targets'],
                                          (batch['mlm_targets'] + 1) % 97).astype(np.int32))
  assert abs(loss_of(trainer, state, used) - base) > 1e-3


def test_padding_rows_do_not_change_the_loss_or_produce_nans():
  config = tiny_config()
  trainer, state, batch = fresh(config)
  padded = {k: v.copy() for k, v in batch.items()}
  padded['segment_ids'][:, 20:] = 0  # the tail of every row is padding
  padded['input_ids'][:, 20:] = 0
  keep = padded['mlm_positions'] < 20
  padded['mlm_weights'] = np.where(keep, padded['mlm_weights'], 0).astype(np.float32)
  other = {k: v.copy() for k, v in padded.items()}
  other['input_ids'][:, 20:] = 11  # what sits in padding must not matter
  assert np.isfinite(loss_of(trainer, state, padded))
  assert loss_of(trainer, state, other) == pytest.approx(loss_of(trainer, state, padded), abs=1e-6)
  _, m = trainer.train_step(state, padded)
  assert np.isfinite(float(m['grad_norm']))


def test_packed_segments_do_not_attend_to_each_other():
  config = tiny_config()
  trainer, state, batch = fresh(config)
  batch['segment_ids'][:, 16:] = 2  # two records per row
  first = dict(batch, mlm_weights=np.where(batch['mlm_positions'] < 16, batch['mlm_weights'], 0)
               .astype(np.float32))
  other = dict(first, input_ids=batch['input_ids'].copy())
  other['input_ids'][:, 16:] = 9  # change only the second record
  assert loss_of(trainer, state, other) == pytest.approx(loss_of(trainer, state, first), abs=1e-6)


def test_schedule_warmup_then_cosine_to_end():
  c = tiny_config(**{'optimizer.warmup_steps': 10, 'train.steps': 110, 'optimizer.end_lr_ratio': 0.1})
  lr = optim.learning_rate_schedule(c)
  peak = c.optimizer.learning_rate
  assert float(lr(0)) == 0.0
  assert float(lr(5)) == pytest.approx(peak / 2)
  assert float(lr(10)) == pytest.approx(peak)
  assert float(lr(60)) == pytest.approx(peak * (0.1 + 0.9 * 0.5), rel=1e-5)  # cosine midpoint
  assert float(lr(110)) == pytest.approx(peak * 0.1, rel=1e-5)
  c.optimizer.schedule = 'linear'
  assert float(optim.learning_rate_schedule(c)(60)) == pytest.approx(peak * 0.55, rel=1e-5)
  c.optimizer.schedule = 'constant'
  assert float(optim.learning_rate_schedule(c)(100)) == pytest.approx(peak)


def test_logged_learning_rate_is_the_one_applied_and_schedule_counts_optimizer_steps():
  # With 4 micro-batches per step the schedule still advances once per optimizer step (seed 003).
  c = tiny_config(**{'train.grad_accum_steps': 4, 'optimizer.warmup_steps': 4})
  trainer = make_trainer(c)
  state = trainer.init_state()
  bs = batches(c, 3)
  trainer.compile_steps(bs[0])
  lrs = []
  for b in bs:
    state, m = trainer.train_step(state, b)
    lrs.append(float(m['learning_rate']))
  peak = c.optimizer.learning_rate
  np.testing.assert_allclose(lrs, [0.0, peak / 4, peak / 2], rtol=1e-6)
  assert int(state['step']) == 3


def test_weight_decay_skips_biases_and_layernorm():
  c = tiny_config()
  trainer = make_trainer(c)
  mask = optim.decay_mask(trainer.abstract_state['params'])
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert any(v for k, v in flat.items() if 'kernel' in k)
  assert not any(v for k, v in flat.items() if "'bias'" in k or "'scale'" in k)
  assert flat[next(k for k in flat if 'word' in k)]


def test_grad_accumulation_equals_one_big_batch():
  one, l1, _ = run(tiny_config(**{'train.grad_accum_steps': 1}), n_steps=2)
  four, l4, _ = run(tiny_config(**{'train.grad_accum_steps': 4}), n_steps=2)
  np.testing.assert_allclose(l1, l4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(one['params']), jax.tree.leaves(four['params'])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize('fsdp', [1, 2])
def test_eight_devices_give_the_one_device_losses(fsdp):
  assert jax.device_count() == 8
  c = tiny_config(**{'model.dropout': 0.1})  # dropout masks must not depend on the device split
  _, one, _ = run(c, n_steps=5, devices=jax.devices()[:1])
  c8 = tiny_config(**{'model.dropout': 0.1, 'sharding.fsdp': fsdp})
  _, eight, trainer = run(c8, n_steps=5)
  assert trainer.mesh.shape == {'data': 8 // fsdp, 'fsdp': fsdp}
  np.testing.assert_allclose(one, eight, atol=1e-5)


def test_fixed_order_reduction_is_bitwise_the_same_for_any_mesh_split():
  """With sharding.fixed_order_reduction every cross-device sum is an all-to-all + an in-device sum
  in device order, so how the 8 devices are split (here data x fsdp; across processes in
  tests/test_multihost.py) cannot change a bit. Without dropout it agrees with the default reduction."""
  fixed = {'sharding.fixed_order_reduction': True, 'train.grad_accum_steps': 2}
  runs = [run(tiny_config(**{'model.dropout': 0.1, 'sharding.fsdp': f, **fixed}), n_steps=3)
          for f in (1, 2, 8)]
  (state, losses, _), others = runs[0], runs[1:]
  for other_state, other_losses, _ in others:
    assert other_losses == losses
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(other_state)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _, default, _ = run(tiny_config(**{'train.grad_accum_steps': 2}), n_steps=3)
  _, ordered, _ = run(tiny_config(**fixed), n_steps=3)
  np.testing.assert_allclose(default, ordered, atol=1e-6)


def test_fsdp_shards_parameters():
  c = tiny_config(**{'model.dropout': 0.1, 'sharding.fsdp': 2})  # the run of the test above
  state, _, _ = run(c, n_steps=5)
  kernel = state['params']['blocks']['ff_in']['kernel'][...]
  assert kernel.sharding.spec.count('fsdp') == 1
  assert kernel.addressable_shards[0].data.size == kernel.size // 2


def test_fsdp_divides_per_device_state_memory():
  from tools.state_memory import state_bytes  # pylint: disable=import-outside-toplevel
  total, one = state_bytes(make_trainer(tiny_config()))
  assert one == total
  for fsdp in (2, 8):
    total_k, per_device = state_bytes(make_trainer(tiny_config(**{'sharding.fsdp': fsdp})))
    assert total_k == total
    # Every matrix divides; only the few vectors too small to split stay whole.
    assert total / fsdp <= per_device < 1.1 * total / fsdp


@pytest.mark.parametrize('variant', [{'model.scan_layers': True}, {'model.remat_policy': 'full'},
                                     {'model.remat_policy': 'save_dots', 'model.scan_layers': True}])
def test_remat_and_scan_do_not_change_the_numbers(variant):
  _, base, _ = run(tiny_config(**{'model.dropout': 0.1}), n_steps=5)
  _, other, _ = run(tiny_config(**{'model.dropout': 0.1, **variant}), n_steps=5)
  np.testing.assert_allclose(base, other, atol=1e-5)


def test_cpu_dense_has_the_linear_layer_s_values_and_gradients():
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from mlm_jax import ops  # pylint: disable=import-outside-toplevel
  layer = nnx.Linear(16, 24, rngs=nnx.Rngs(0))
  layer.bias[...] = jax.random.normal(jax.random.key(1), (24,))
  x = jax.random.normal(jax.random.key(2), (3, 5, 16))
  graphdef, params = nnx.split(layer)

  def loss(params, x, via_dense):
    lin = nnx.merge(graphdef, params)
    y = ops.dense(lin, x) if via_dense else lin(x)
    return jax.numpy.sum(jax.numpy.sin(y))

  assert jax.default_backend() == 'cpu'  # so ops.dense takes its own path
  for argnums in (0, 1):
    want = jax.grad(loss, argnums)(params, x, False)
    got = jax.grad(loss, argnums)(params, x, True)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ops.dense(layer, x), layer(x), rtol=1e-6, atol=1e-6)


def test_auto_attention_falls_back_to_xla_where_cudnn_refuses(monkeypatch):
  """On a GPU 'auto' tries cuDNN for 16-bit inputs; where cuDNN is missing or refuses the shapes (here:
  a CPU posing as a GPU), the XLA kernel runs instead, with the same numbers."""
  from mlm_jax import ops  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 16, 4, 8)), jnp.bfloat16) for _ in range(3))
  seg = jnp.asarray([[1] * 10 + [2] * 6, [1] * 16])
  mask = (seg[:, :, None] == seg[:, None, :])[:, None]
  want = ops.attention(q, k, v, mask, 'xla')
  monkeypatch.setattr(ops, '_backend', lambda: 'gpu')
  with pytest.raises(Exception):
    jax.jit(lambda: ops.attention(q, k, v, mask, 'cudnn'))()
  got = jax.jit(lambda: ops.attention(q, k, v, mask, 'auto'))()
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_nonfinite_update_is_never_applied():
  c = tiny_config()
  trainer, state, batch = fresh(c)
  before = jax.tree.map(np.asarray, state['params'])
  bad = dict(batch, mlm_weights=np.full_like(batch['mlm_weights'], np.nan))
  state, m = trainer.train_step(state, bad)
  assert bool(m['nonfinite'])
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state['params'])):
    np.testing.assert_array_equal(a, np.asarray(b))
