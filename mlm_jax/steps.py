"""The pure, jitted train and eval steps.

State is a dict pytree: {'step', 'params' (nnx.State), 'opt_state', 'key' (uint32 key data)}.
Randomness is a pure function of (key, step, micro-batch) (and of the device index with
sharding.fixed_order_reduction), so a resumed run draws the same dropout.
"""
import functools
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mlm_jax import sharding as shd


def init_state(params, optimizer, seed: int):
  return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': optimizer.init(params),
          'key': jax.random.key_data(jax.random.key(seed))}


def _mlm_sums(graphdef, params, batch, dropout_key):
  """Sums over the prediction slots: (loss_sum, correct_sum). Unused slots have weight 0."""
  logits_BPV = nnx.merge(graphdef, params)(batch, dropout_key)
  targets_BP, weights_BP = batch['mlm_targets'], batch['mlm_weights']
  # Cross-entropy and accuracy from one max over the vocabulary: the target is predicted when its
  # logit is the largest (an argmax over V would be a second, slower pass for the same answer).
  max_BP = jax.lax.stop_gradient(jnp.max(logits_BPV, axis=-1))
  shifted_BPV = logits_BPV - max_BP[..., None]
  target_BP = jnp.take_along_axis(shifted_BPV, targets_BP[..., None], axis=-1)[..., 0]
  ce_BP = jnp.log(jnp.sum(jnp.exp(shifted_BPV), axis=-1)) - target_BP
  correct_BP = (target_BP >= 0).astype(jnp.float32)
  return jnp.sum(ce_BP * weights_BP), jnp.sum(correct_BP * weights_BP)


def _gradients(params, batch, step_key, denominator, *, graphdef, grad_accum_steps: int,
               use_dropout: bool, mesh=None):
  """(grads, loss_sum, correct_sum) of Σ(weight·CE)/denominator over `batch`, accumulated over
  `grad_accum_steps` micro-batches in a lax.scan. Dropout keys: fold_in(step_key, micro-batch)."""

  def micro_loss(params, micro, i):
    key = jax.random.fold_in(step_key, i) if use_dropout else None
    loss_sum, correct_sum = _mlm_sums(graphdef, params, micro, key)
    return loss_sum / denominator, (loss_sum, correct_sum)

  grad_fn = jax.grad(micro_loss, has_aux=True)
  if grad_accum_steps == 1:
    grads, (loss_sum, correct_sum) = grad_fn(params, batch, 0)
    return grads, loss_sum, correct_sum
  a = grad_accum_steps

  def split(x):
    # Row r goes to micro-batch r % a, so each micro-batch stays spread over every device.
    x = x.reshape(x.shape[0] // a, a, *x.shape[1:]).swapaxes(0, 1)
    if mesh is not None:
      spec = PartitionSpec(None, shd.BATCH_AXES)
      x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return x

  def body(carry, inputs):
    grads_acc, loss_acc, correct_acc = carry
    micro, i = inputs
    grads, (loss_sum, correct_sum) = grad_fn(params, micro, i)
    return (jax.tree.map(jnp.add, grads_acc, grads), loss_acc + loss_sum,
            correct_acc + correct_sum), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  (grads, loss_sum, correct_sum), _ = jax.lax.scan(
      body, (zeros, 0.0, 0.0), (jax.tree.map(split, batch), jnp.arange(a)))
  return grads, loss_sum, correct_sum


def _ordered_sum(x, n: int):
  """Σ over the devices of `x` (this device's partial), added in device order: an all-to-all gives
  each device one 1/n slice of every device's partial, the device adds those n rows, and an
  all-gather reassembles the slices. Pure data movement plus a local reduction, so the bits do not
  depend on the collective library (gloo across processes vs in-process) or the process layout;
  same traffic as a ring all-reduce."""
  flat = x.reshape(-1)
  m = -(-flat.size // n)
  parts_NM = jnp.pad(flat, (0, n * m - flat.size)).reshape(n, m)
  received_NM = jax.lax.all_to_all(parts_NM, shd.BATCH_AXES, 0, 0)  # row j: device j's slice
  summed_M = jnp.sum(received_NM, axis=0)
  whole = jax.lax.all_gather(summed_M, shd.BATCH_AXES, tiled=True)
  return whole[:flat.size].reshape(x.shape)


def _ordered_scalar_sums(*xs):
  gathered_NK = jax.lax.all_gather(jnp.stack(xs), shd.BATCH_AXES)
  return tuple(jnp.sum(gathered_NK, axis=0))


def _per_device(local, mesh, num_outputs: int):
  """`local(params, batch)` on each device's own rows, parameters replicated. Its outputs must be
  replicated by construction (all-gathers); check_vma=False because the accumulation scan's carry
  starts from replicated zeros, which the check cannot follow."""
  return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(shd.BATCH_AXES)),
                       out_specs=(PartitionSpec(),) * num_outputs, check_vma=False)


def _fixed_order_gradients(params, batch, step_key, denominator, *, mesh, **kw):
  """`_gradients` per device (its own rows, dropout keyed by its index), then every sum across
  devices in a fixed order: bitwise the same for 1 process x 4 devices and 2 processes x 2 devices."""
  n = mesh.size

  def local(params, batch):
    device_key = jax.random.fold_in(step_key, jax.lax.axis_index(shd.BATCH_AXES))
    grads, loss_sum, correct_sum = _gradients(params, batch, device_key, denominator, **kw)
    grads = jax.tree.map(lambda g: _ordered_sum(g, n), grads)
    loss_sum, correct_sum = _ordered_scalar_sums(loss_sum, correct_sum)
    return grads, loss_sum, correct_sum, optax.tree.norm(grads)  # norm of replicated values: local

  return _per_device(local, mesh, 4)(params, batch)


def micro_batches(train_config, step: int) -> int:
  """Micro-batches in optimizer step `step` (0-based): train.grad_accum_steps, except during the
  batch-size ramp (R = batch_ramp_steps > 0, from k0 = batch_ramp_start to A = grad_accum_steps):
  k(step) = k0 + floor((A - k0) * step / R) for step < R (linear, rounded down: the R ramp steps
  are shared as evenly as whole steps allow by the counts k0 .. A-1), then A from step R on. A pure
  function of the step, so the input position after any step is one too (exact resume)."""
  t = train_config
  a, r = t.grad_accum_steps, t.batch_ramp_steps
  if not r or step >= r:
    return a
  return t.batch_ramp_start + (a - t.batch_ramp_start) * step // r


def train_step(state, batch, *, graphdef, optimizer, schedule, grad_accum_steps: int,
               use_dropout: bool, mesh=None, fixed_order: bool = False):
  """One optimizer step over the global batch, as `grad_accum_steps` micro-batches in a lax.scan.

  The loss is Σ(weight·CE) / Σweight over the WHOLE global batch (during the batch-size ramp, all
  rows of this step's micro-batches), so accumulation, device count and process count do not
  change the gradient (up to float summation order; `fixed_order` fixes that order too, see config
  sharding.fixed_order_reduction).
  """
  params = state['params']
  weight_sum = jnp.sum(batch['mlm_weights'])  # 0/1 weights: exact in any order
  denominator = jnp.maximum(weight_sum, 1.0)
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state['key']), state['step'])
  kw = dict(graphdef=graphdef, grad_accum_steps=grad_accum_steps, use_dropout=use_dropout)
  if fixed_order:
    grads, loss_sum, correct_sum, grad_norm = _fixed_order_gradients(
        params, batch, step_key, denominator, mesh=mesh, **kw)
  else:
    grads, loss_sum, correct_sum = _gradients(params, batch, step_key, denominator, mesh=mesh, **kw)
    grad_norm = optax.tree.norm(grads)
  count = optax.tree_utils.tree_get(state['opt_state'], 'count', filtering=_is_schedule_count)
  # A non-finite loss or gradient never reaches the parameters: the update is skipped here and the
  # host decides (config train.nonfinite) whether to halt or go on. A lax.cond rather than
  # jnp.where(finite, new, old): with where, XLA keeps a copy of the old optimizer state and
  # parameters alive next to the new ones (a full copy of them every step); cond updates in place.
  finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)

  def update(params, opt_state):
    # Clipping takes the norm computed above (once per step, and in fixed order when asked).
    updates, opt_state = optimizer.update(grads, opt_state, params, grad_norm=grad_norm)
    return optax.apply_updates(params, updates), opt_state

  new_params, new_opt_state = jax.lax.cond(finite, update, lambda p, o: (p, o), params,
                                           state['opt_state'])
  new_state = {'step': state['step'] + 1, 'params': new_params, 'opt_state': new_opt_state,
               'key': state['key']}
  metrics = {'loss_sum': loss_sum, 'correct_sum': correct_sum, 'weight_sum': weight_sum,
             'tokens': jnp.sum(batch['segment_ids'] > 0), 'grad_norm': grad_norm,
             'learning_rate': schedule(count), 'nonfinite': ~finite}
  return new_state, metrics


def _is_schedule_count(path, value):
  del value
  return getattr(path[-1], 'tuple_name', None) == 'ScaleByScheduleState'


def eval_step(params, batch, *, graphdef, mesh=None, fixed_order: bool = False):
  if fixed_order:
    def local(params, batch):
      return _ordered_scalar_sums(*_mlm_sums(graphdef, params, batch, None))
    loss_sum, correct_sum = _per_device(local, mesh, 2)(params, batch)
  else:
    loss_sum, correct_sum = _mlm_sums(graphdef, params, batch, None)
  return {'loss_sum': loss_sum, 'correct_sum': correct_sum,
          'weight_sum': jnp.sum(batch['mlm_weights'])}


def jit_train_step(graphdef, optimizer, schedule, config, mesh, state_shardings, batch_keys):
  step = functools.partial(
      train_step, graphdef=graphdef, optimizer=optimizer, schedule=schedule,
      grad_accum_steps=config.train.grad_accum_steps,
      use_dropout=config.model.dropout > 0 or config.model.attention_dropout > 0, mesh=mesh,
      fixed_order=config.sharding.fixed_order_reduction)
  batch_shardings = {k: shd.batch_sharding(mesh) for k in batch_keys}
  return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, shd.replicated(mesh)), donate_argnums=0)


def jit_eval_step(graphdef, mesh, params_shardings, batch_keys, fixed_order: bool = False):
  batch_shardings = {k: shd.batch_sharding(mesh) for k in batch_keys}
  return jax.jit(functools.partial(eval_step, graphdef=graphdef, mesh=mesh, fixed_order=fixed_order),
                 in_shardings=(params_shardings, batch_shardings),
                 out_shardings=shd.replicated(mesh))


def compile_ahead(jitted, *abstract_args):
  """(compiled, seconds): `jitted` lowered and compiled for abstract arguments (ShapeDtypeStructs
  with shardings), so compile time is spent before the first real call and its memory can be read
  off. The one compile path of training, auto accumulation and `mlm_jax.evaluate`."""
  tic = time.perf_counter()
  compiled = jitted.lower(*abstract_args).compile()
  return compiled, time.perf_counter() - tic


def run_eval(params, local_batches, *, mesh, compile_for) -> dict:
  """Σ loss, Σ correct and Σ weight of the eval step over `local_batches` (this process's rows).

  `compile_for(local_batch)` gives the compiled eval step; it is called on the first batch only.
  Every batch is dispatched before any result is fetched."""
  eval_step, pending = None, []
  for local_batch in local_batches:
    if eval_step is None:
      eval_step = compile_for(local_batch)
    pending.append(eval_step(params, shd.global_batch(local_batch, mesh)))
  sums = {'loss_sum': 0.0, 'correct_sum': 0.0, 'weight_sum': 0.0}
  for m in jax.device_get(pending):
    for k in sums:
      sums[k] += float(m[k])
  return sums
