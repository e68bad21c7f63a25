"""AdamW with a decay mask, global-norm clipping and warmup + cosine/linear/constant schedule.

The schedule is indexed by OPTIMIZER steps (gradient accumulation happens inside one step), so
`train.steps` is the schedule's length whatever `train.grad_accum_steps` is.
"""
import jax
import optax


def learning_rate_schedule(config) -> optax.Schedule:
  o, steps = config.optimizer, config.train.steps
  peak, warmup = o.learning_rate, o.warmup_steps
  end = peak * o.end_lr_ratio
  if o.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, warmup + 1), end)
  warm = optax.linear_schedule(0.0, peak, warmup)
  if o.schedule == 'linear':
    after = optax.linear_schedule(peak, end, max(steps - warmup, 1))
  else:
    after = optax.constant_schedule(peak)
  return optax.join_schedules([warm, after], [warmup])


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


def make_optimizer(config) -> optax.GradientTransformation:
  o = config.optimizer
  adamw = optax.adamw(learning_rate_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps,
                      weight_decay=o.weight_decay, mask=decay_mask)
  if o.clip_norm > 0:
    return optax.chain(clip_by_global_norm(o.clip_norm), adamw)
  return adamw
