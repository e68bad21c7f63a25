"""The wsd schedule and StableAdamW-style update clipping (mlm_jax/optim.py), against numbers
worked out by hand."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mlm_jax import config as config_lib
from mlm_jax import optim
from mlm_jax.errors import ConfigError


def wsd_config(**optimizer):
  c = config_lib.base_config()
  c.train.steps = 100
  c.optimizer.update(schedule='wsd', learning_rate=2.0, end_lr_ratio=0.1, warmup_steps=10,
                     wsd_decay_fraction=0.25)
  c.optimizer.update(**optimizer)
  config_lib.validate(c)
  return c


def test_wsd_warms_up_holds_the_peak_then_decays_as_one_minus_sqrt():
  lr = optim.learning_rate_schedule(wsd_config())
  # Peak 2, end 0.2; warmup 10 steps; decay over the last 25 of 100 steps, from step 75.
  expected = {0: 0.0, 5: 1.0, 10: 2.0, 40: 2.0, 75: 2.0,  # t = 0 at the decay's first step
              79: 0.2 + 1.8 * (1 - 0.4),   # t = 4/25 = 0.16, sqrt = 0.4
              84: 0.2 + 1.8 * (1 - 0.6),   # t = 9/25 = 0.36 (mid-decay)
              91: 0.2 + 1.8 * (1 - 0.8),   # t = 16/25 = 0.64
              99: 0.2 + 1.8 * (1 - math.sqrt(0.96)),  # the last update
              100: 0.2}                    # where the schedule ends
  for step, value in expected.items():
    assert float(lr(step)) == pytest.approx(value, rel=1e-6, abs=1e-7), step
  # The decay only ever goes down, and never below the end value.
  decay_S = np.asarray(lr(np.arange(75, 101)))
  assert (np.diff(decay_S) < 0).all() and decay_S.min() == pytest.approx(0.2)


def test_plot_schedule_marks_the_wsd_decay():
  from tools import plot_schedule  # pylint: disable=import-outside-toplevel
  report = plot_schedule.report(wsd_config())
  assert report.splitlines()[0] == 'wsd schedule over 100 steps (warmup 10, decay 25):'
  assert 'step      75 (start of decay): lr 2\n' in report
  assert 'step      87 (middle of decay): lr 0.7529\n' in report  # t = 12/25: 0.2 + 1.8 * 0.3072
  assert report.endswith('step      99 (last): lr 0.2364')


def test_wsd_edge_fractions():
  stable = optim.learning_rate_schedule(wsd_config(wsd_decay_fraction=0.0))
  assert float(stable(99)) == float(stable(100)) == 2.0  # no decay: warmup then the peak
  decay_only = optim.learning_rate_schedule(wsd_config(wsd_decay_fraction=1.0, warmup_steps=0))
  assert float(decay_only(0)) == 2.0
  assert float(decay_only(25)) == pytest.approx(0.2 + 1.8 * 0.5)  # t = 0.25


def test_wsd_config_errors_name_the_field():
  with pytest.raises(ConfigError, match='optimizer.wsd_decay_fraction'):
    wsd_config(wsd_decay_fraction=1.5)
  # 80 warmup + 25 decay > 100 steps: a warning, and the decay takes the 20 steps after warmup.
  short = optim.learning_rate_schedule(wsd_config(warmup_steps=80))
  assert float(short(80)) == 2.0 and float(short(90)) == pytest.approx(0.2 + 1.8 * (1 - 0.5 ** 0.5))
  wsd_config(warmup_steps=80, schedule='cosine')  # the fraction only matters for wsd


# ---------------------------------------------------------------------------------------------
# Update clipping.


def clipping_config(update_clipping=True, **optimizer):
  c = config_lib.base_config()
  c.optimizer.update(schedule='constant', warmup_steps=0, learning_rate=0.1, b1=0.5, b2=0.5,
                     eps=1e-8, weight_decay=0.1, clip_norm=0.0, update_clipping=update_clipping)
  c.optimizer.update(**optimizer)
  config_lib.validate(c)
  return c


def run_updates(config, params, grads_seq):
  opt = optim.make_optimizer(config)
  state = opt.init(params)
  for grads in grads_seq:
    updates, state = opt.update(grads, state, params, grad_norm=optax.tree.norm(grads))
    params = optax.apply_updates(params, updates)
  return params, state


def test_update_clipping_scales_only_the_tensor_whose_rms_is_above_one():
  """b1 = b2 = 0.5, lr 0.1, decay 0.1 on the kernel only. Step 1: every gradient 1 (RMS 1: no clip).
  Step 2: the kernel's gradient jumps to 3 (RMS > 1: its whole update, decay included, shrinks);
  the bias's stays 1 (RMS 1) and its update is adamw's, bit for bit."""
  params = {'kernel': jnp.full((1, 2), 2.0), 'bias': jnp.full((2,), 1.0)}
  grads = [{'kernel': jnp.full((1, 2), g), 'bias': jnp.ones((2,))} for g in (1.0, 3.0)]
  clipped, _ = run_updates(clipping_config(), params, grads)
  plain, _ = run_updates(clipping_config(update_clipping=False), params, grads)

  # By hand. Step 1: m_hat = v_hat = 1, so the Adam direction is 1/(1 + eps).
  kernel_1 = 2.0 - 0.1 * (1 / (1 + 1e-8) + 0.1 * 2.0)  # 1.88
  # Step 2: m = 0.5*0.5 + 0.5*3 = 1.75, v = 0.5*0.5 + 0.5*9 = 4.75; bias correction 1 - 0.25.
  m_hat, v_hat = 1.75 / 0.75, 4.75 / 0.75
  direction = m_hat / (math.sqrt(v_hat) + 1e-8) + 0.1 * kernel_1
  rms = math.sqrt(9.0 / v_hat)  # every element alike: sqrt(mean(g^2 / v_hat)) = 1.1921
  assert rms > 1
  np.testing.assert_allclose(clipped['kernel'], kernel_1 - 0.1 / rms * direction, rtol=1e-6)
  np.testing.assert_allclose(plain['kernel'], kernel_1 - 0.1 * direction, rtol=1e-6)
  # The bias (no decay: 1-d): 1 - 0.1 - 0.1, unchanged by the clipping.
  np.testing.assert_allclose(clipped['bias'], 0.8, rtol=1e-6)
  np.testing.assert_array_equal(clipped['bias'], plain['bias'])


def test_update_clipping_equals_adamw_when_it_never_triggers():
  """Gradients that shrink every step (and are half zeros at first) keep each tensor's RMS below 1,
  so every update is plain adamw's, bit for bit, over several steps."""
  rng = np.random.default_rng(0)
  params = {'kernel': jnp.asarray(rng.normal(size=(4, 8)), jnp.float32),
            'bias': jnp.asarray(rng.normal(size=(8,)), jnp.float32)}
  base = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
  base = {k: np.where(np.arange(v.size).reshape(v.shape) % 2, v, 0) for k, v in base.items()}
  grads = [{k: jnp.asarray(v * 0.5**t) for k, v in base.items()} for t in range(5)]
  config = dict(b1=0.9, b2=0.99, eps=1e-6, learning_rate=1e-2)
  clipped, clipped_state = run_updates(clipping_config(**config), params, grads)
  plain, plain_state = run_updates(clipping_config(update_clipping=False, **config), params, grads)
  for a, b in zip(jax.tree.leaves((clipped, clipped_state)), jax.tree.leaves((plain, plain_state))):
    np.testing.assert_array_equal(a, b)


def test_update_clipping_scale_by_hand():
  g = jnp.array([2.0, 0.0, 1.0, 1.0])
  v_hat = jnp.array([1.0, 0.0, 1.0, 0.25])  # the zero is floored at eps^2: 0 / eps^2 = 0
  # mean(4/1, 0, 1/1, 1/0.25) = 9/4; sqrt = 1.5
  assert float(optim.update_clipping_scale(g, v_hat, 1e-6)) == pytest.approx(1 / 1.5)
  assert float(optim.update_clipping_scale(g / 4, v_hat, 1e-6)) == 1.0  # RMS 0.375: no clip


def test_optimizer_state_structure_is_todays_with_or_without_update_clipping():
  """update_clipping=False builds exactly the optimizer of before (old checkpoints restore); True
  reads adamw's own state, so its state has that same structure too."""
  params = {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones((3,))}
  for clip_norm in (0.0, 1.0):
    c = clipping_config(update_clipping=False, clip_norm=clip_norm)
    o = c.optimizer
    adamw = optax.adamw(optim.learning_rate_schedule(c), b1=o.b1, b2=o.b2, eps=o.eps,
                        weight_decay=o.weight_decay, mask=optim.decay_mask)
    before = optax.chain(optim.clip_by_global_norm(clip_norm), adamw) if clip_norm else adamw
    want = jax.tree.structure(before.init(params))
    for on in (False, True):
      opt = optim.make_optimizer(clipping_config(update_clipping=on, clip_norm=clip_norm))
      assert jax.tree.structure(opt.init(params)) == want


def test_train_step_runs_wsd_with_update_clipping_and_no_global_clip():
  """The combination ModernBERT uses (update clipping instead of gradient clipping): the train step
  passes its grad_norm extra argument through, and logs the wsd learning rate it applies."""
  # pylint: disable-next=import-outside-toplevel
  from tests.test_train_step import batches, make_trainer, tiny_config
  c = tiny_config(**{'optimizer.update_clipping': True, 'optimizer.clip_norm': 0.0,
                     'optimizer.schedule': 'wsd', 'optimizer.wsd_decay_fraction': 0.5,
                     'train.steps': 4, 'optimizer.warmup_steps': 1})
  trainer = make_trainer(c)
  bs = batches(c, 4)
  trainer.compile_steps(bs[0])
  state, lrs = trainer.init_state(), []
  for b in bs:
    state, m = trainer.train_step(state, b)
    assert np.isfinite(float(m['loss_sum'])) and not bool(m['nonfinite'])
    lrs.append(float(m['learning_rate']))
  peak = c.optimizer.learning_rate  # warmup 1, peak at step 1, decay over steps 2-3 to 0
  np.testing.assert_allclose(lrs, [0.0, peak, peak, peak * (1 - math.sqrt(0.5))], rtol=1e-6)
