"""AdamW with a decay mask, global-norm clipping, optional per-tensor update clipping (StableAdamW),
and warmup + cosine/linear/constant/wsd schedule.

The schedule is indexed by OPTIMIZER steps (gradient accumulation happens inside one step), so
`train.steps` is the schedule's length whatever `train.grad_accum_steps` is. docs/recipes.md says
where the wsd schedule and the update clipping come from.
"""
import jax
import jax.numpy as jnp
import optax


def wsd_decay_steps(config) -> int:
  """Steps of the wsd schedule's final 1-sqrt decay: round(wsd_decay_fraction * train.steps), cut
  short so that it starts no earlier than the end of warmup (a run too short for both)."""
  o, steps = config.optimizer, config.train.steps
  decay = int(round(o.wsd_decay_fraction * steps))
  return max(0, min(decay, steps - o.warmup_steps))


def learning_rate_schedule(config) -> optax.Schedule:
  o, steps = config.optimizer, config.train.steps
  peak, warmup = o.learning_rate, o.warmup_steps
  end = peak * o.end_lr_ratio
  if o.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, warmup + 1), end)
  warm = optax.linear_schedule(0.0, peak, warmup)
  if o.schedule == 'wsd':
    decay = wsd_decay_steps(config)
    stable = optax.constant_schedule(peak)
    return optax.join_schedules([warm, stable, _sqrt_decay(peak, end, decay)],
                                [warmup, steps - decay])
  if o.schedule == 'linear':
    after = optax.linear_schedule(peak, end, max(steps - warmup, 1))
  else:
    after = optax.constant_schedule(peak)
  return optax.join_schedules([warm, after], [warmup])


def _sqrt_decay(peak: float, end: float, steps: int) -> optax.Schedule:
  """end + (peak - end) * (1 - sqrt(t)), t = count / steps clipped to [0, 1] (Hägele et al. 2024):
  it leaves the stable phase more gently than a linear decay and drops fastest at the very end."""
  def schedule(count):
    t = jnp.clip(jnp.asarray(count, jnp.float32) / max(steps, 1), 0.0, 1.0)
    return end + (peak - end) * (1.0 - jnp.sqrt(t))
  return schedule


def decay_mask(params):
  """Weight decay on matrices only: not on biases, LayerNorm scales or any 1-d parameter."""
  # Stacked encoder blocks carry a leading layers axis, so look at the name, not just ndim.
  def keep(path, x):
    name = jax.tree_util.keystr(path)
    return not ("'bias'" in name or "'scale'" in name or x.ndim <= 1)
  return jax.tree_util.tree_map_with_path(keep, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """optax.clip_by_global_norm (same formula), but it takes the norm the train step has already
  computed (`grad_norm=` extra argument): computed once per step, in fixed order when asked."""

  def update(updates, state, params=None, *, grad_norm=None, **extra_args):
    del params, extra_args
    norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
    keep = norm < max_norm
    return jax.tree.map(lambda t: jax.lax.select(keep, t, (t / norm.astype(t.dtype)) * max_norm),
                        updates), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def update_clipping_scale(grad, nu_hat, eps: float):
  """1 / max(1, RMS) with RMS = sqrt(mean(g^2 / max(nu_hat, eps^2))) over one tensor: the factor
  StableAdamW (Wortsman et al. 2023) puts on that tensor's learning rate. nu_hat is Adam's
  bias-corrected second moment, already updated with this g (Adafactor's update clipping: the
  RMS is that of the update g / sqrt(nu_hat) before momentum)."""
  g2 = jnp.square(grad.astype(jnp.float32))
  rms = jnp.sqrt(jnp.mean(g2 / jnp.maximum(nu_hat.astype(jnp.float32), eps * eps)))
  return 1.0 / jnp.maximum(1.0, rms)


def with_update_clipping(adamw: optax.GradientTransformationExtraArgs, b2: float,
                         eps: float) -> optax.GradientTransformationExtraArgs:
  """`adamw` whose update of each tensor is scaled by `update_clipping_scale`: the learning rate
  of that tensor divided by max(1, RMS), weight decay included (it stays decoupled and masked:
  it is adamw's own term, scaled with the rest, as StableAdamW's lr * wd * theta).

  The state is adamw's own, unchanged: the second moment is read from it after its update."""

  def update(grads, state, params=None, **extra_args):
    updates, state = adamw.update(grads, state, params, **extra_args)
    adam = next(s for s in state if isinstance(s, optax.ScaleByAdamState))
    nu_hat = optax.tree.bias_correction(adam.nu, b2, adam.count)  # count: already this step's
    scales = jax.tree.map(lambda g, v: update_clipping_scale(g, v, eps), grads, nu_hat)
    return jax.tree.map(lambda u, s: (u * s).astype(u.dtype), updates, scales), state

  return optax.GradientTransformationExtraArgs(adamw.init, update)


def make_optimizer(config) -> optax.GradientTransformation:
  o = config.optimizer
  adamw = optax.adamw(learning_rate_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps,
                      weight_decay=o.weight_decay, mask=decay_mask)
  if o.update_clipping:
    adamw = with_update_clipping(adamw, o.b2, o.eps)
  if o.clip_norm > 0:
    return optax.chain(clip_by_global_norm(o.clip_norm), adamw)
  return adamw
