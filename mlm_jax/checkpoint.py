"""Checkpoints for bitwise-exact resume: train state and run metadata.

One checkpoint is an orbax step directory with two items: 'state' (params, optimizer state, step,
PRNG key data; StandardSave) and 'metadata' (JSON: the caller's config, the input position of every
input shard, and the like, plus library versions and our SHA-256 of the state). The input position
lives only in that JSON, so a checkpoint written by N processes resumes in any number of them.
A third item, 'tokenizer' (JSON: the tokenizer's files by name), makes one step directory enough to
evaluate, predict or export with; steps saved before it existed have none.

Orbax does not notice flipped bytes in an array file: it restores them silently. So every save
records `digest(state)` and every restore recomputes it; a checkpoint that fails to read or does not
match is logged, renamed to `<step>.corrupt-<time>` and the previous one is used.
"""
import hashlib
import importlib.metadata
import math
import sys
import time
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mlm_jax import config as config_lib
from mlm_jax import paths
from mlm_jax.errors import ConfigError

STATE, META, TOKENIZER = 'state', 'metadata', 'tokenizer'
COMMIT_MARKER = 'commit_success.txt'  # orbax 0.12 writes it last, in every step directory
_RESERVED_META = ('versions', 'state_sha256', 'checkpoint_info')

class CheckpointError(RuntimeError):
  """A save failed, or no usable checkpoint could be restored."""


class _Unusable(Exception):
  """This step cannot be restored (corrupt or half-written); an older one may be."""


# ---------------------------------------------------------------------------------------------
# Digest: SHA-256 over per-leaf fingerprints computed on device.
#
# Each leaf's fingerprint is two 32-bit sums over its elements of mix(bits(x_i) ^ mix(i + seed)),
# `mix` being murmur3's bijective finalizer and i the element's flat index in the *global* array.
# Integer sums wrap mod 2^32, so the result does not depend on how the array is sharded, on the
# number of devices or processes, or on the reduction order: every process gets the same value
# without gathering the array to a host. A change of one element always changes the sum (mix is a
# bijection); two or more changes cancel with probability ~2^-64. The digest is the SHA-256 of the
# sorted (path, dtype, shape, fingerprint) lines.


def _mix32(h):
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


@jax.jit
def _fingerprint(x):
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  w_N = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)  # 8-byte types gain a dim of 2
  if w_N.ndim == 0:
    w_N = w_N.reshape(1)
  # Flat index from per-dimension iotas: a reshape of a sharded array could move data.
  index, stride = jnp.zeros(w_N.shape, jnp.uint32), 1
  for d in reversed(range(w_N.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, w_N.shape, d) * jnp.uint32(stride)
    stride = stride * w_N.shape[d] % 2**32
  return jnp.stack([jnp.sum(_mix32(w_N ^ _mix32(index + jnp.uint32(seed))), dtype=jnp.uint32)
                    for seed in (0x9E3779B9, 0x7F4A7C15)])


def _path_str(path) -> str:
  """'opt_state/0/mu/kernel/value', alike for a live pytree and orbax's saved dict/list tree."""
  parts = []
  for k in path:
    for attr in ('key', 'idx', 'name'):  # DictKey, SequenceKey/FlattenedIndexKey, GetAttrKey
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '/'.join(parts)


def digest(state) -> str:
  """SHA-256 (hex) of a state pytree, independent of its sharding and of the device count."""
  lines, pending = [], []
  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    x = x if hasattr(x, 'dtype') else np.asarray(x)
    shape, dtype = tuple(x.shape), str(x.dtype)
    if isinstance(x, np.ndarray) and x.dtype.itemsize == 8:  # jax may not hold 64-bit: split here
      x = np.ascontiguousarray(x).view(np.uint32).reshape(shape + (2,))  # as bitcast would
    pending.append((_path_str(path), dtype, shape, _fingerprint(x)))  # dispatch all, then fetch
  for path, dtype, shape, fp in pending:
    fp = np.asarray(fp.addressable_data(0))  # replicated: every process holds the whole value
    lines.append(f'{path}\t{dtype}\t{shape}\t{int(fp[0]):08x}{int(fp[1]):08x}\n')
  return hashlib.sha256(''.join(sorted(lines)).encode()).hexdigest()


def _is_saved_leaf(x) -> bool:
  # Not "has .shape": nnx.Variable has one too, and its path must go on to '/value'.
  return isinstance(x, (jax.ShapeDtypeStruct, ocp.metadata.Metadata))


def _signature(tree) -> dict[str, tuple]:
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_saved_leaf)[0]
  return {_path_str(p): (tuple(x.shape), np.dtype(x.dtype).name) for p, x in leaves}


def _host_target(saved_tree):
  """Restore target from orbax's saved tree, all on one local device (saved shardings may name
  devices this process does not have; orbax would refuse them)."""
  one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), saved_tree,
                      is_leaf=_is_saved_leaf)


def versions() -> dict[str, str]:
  out = {'python': sys.version.split()[0]}
  for dist in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain', 'numpy'):
    try:
      out[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      out[dist] = 'missing'
  return out


def _brief(e: Exception) -> str:
  """One line of an exception: tensorstore errors run to dozens of lines."""
  text = str(e).strip().splitlines()
  return f'{type(e).__name__}: {text[0][:500] if text else ""}'


def _scalars(metrics: dict | None) -> dict[str, float]:
  out = {}
  for k, v in (metrics or {}).items():
    try:
      out[k] = float(v)
    except (TypeError, ValueError):
      pass  # not a scalar metric: nothing to rank by
  return out


def _all_processes_agree(ok: bool) -> bool:
  """True only if `ok` on every process, so all of them take the same fallback decision."""
  if jax.process_count() == 1:
    return ok
  return bool(np.min(multihost_utils.process_allgather(np.array([int(ok)], np.int32))))


# ---------------------------------------------------------------------------------------------


class Checkpointer:
  """Saves and restores (state, data iterator, metadata) with orbax in `directory`."""

  def __init__(self, directory, *, keep: int = 3, keep_best: int = 1,
               best_metric: str = 'eval/loss', best_mode: str = 'min', async_save: bool = True,
               save_every: int = 1, read_only: bool = False):
    """`save_every`: non-forced saves only at its multiples (1: wherever the caller asks)."""
    if keep < 1:
      raise ConfigError('checkpoint.keep', f'must be >= 1 (the newest checkpoint is always kept), '
                        f'got {keep}')
    if keep_best < 0:
      raise ConfigError('checkpoint.keep_best', f'must be >= 0, got {keep_best}')
    if best_mode not in ('min', 'max'):
      raise ConfigError('checkpoint.best_mode', f"must be 'min' or 'max', got {best_mode!r}")
    if save_every < 1:
      raise ConfigError('checkpoint.every', f'must be >= 1, got {save_every}')
    # orbax needs absolute paths (gs:// and the like already are); paths also keeps fsspec from
    # caching object-store listings, which would hide steps tensorstore wrote.
    directory = paths.absolute(str(directory))
    self.directory = epath.Path(directory)
    self.best_metric, self.best_mode = best_metric, best_mode
    self.last_blocking_s = 0.0
    self._read_only = read_only
    self._in_flight = None  # step whose asynchronous save has not been checked yet
    self._closed = False

    worst = math.inf if best_mode == 'min' else -math.inf
    best_fn = lambda m: float(m.get(best_metric, worst))  # a renamed metric ranks last
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item, save_args, restore_args in ((STATE, ocp.args.StandardSave, ocp.args.StandardRestore),
                                          (META, ocp.args.JsonSave, ocp.args.JsonRestore),
                                          (TOKENIZER, ocp.args.JsonSave, ocp.args.JsonRestore)):
      registry.add(item, save_args)
      registry.add(item, restore_args)
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(save_every), policies.PreemptionCheckpointingPolicy()]),
        # Newest `keep` plus best `keep_best`; steps without the metric only count as newest.
        preservation_policy=policies.AnyPreservationPolicy([
            policies.LatestN(keep),
            policies.BestN(get_metric_fn=best_fn, reverse=best_mode == 'min', n=keep_best,
                           keep_checkpoints_without_metrics=False)]),
        best_fn=best_fn, best_mode=best_mode,  # makes orbax write each step's metrics
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only,  # '<step>.orbax-checkpoint-tmp' from a killed save
        read_only=read_only, create=not read_only)
    self._mngr = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)
    if not read_only:
      self._drop_uncommitted()

  def _step_dir(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def _drop_uncommitted(self):
    # Locally orbax commits by renaming a tmp dir, and lists any step-named directory, even one
    # without its commit marker (e.g. half copied by hand). Such a step must never be resumed from.
    for step in self._mngr.all_steps():
      if not (self._step_dir(step) / COMMIT_MARKER).exists():
        logging.warning('Checkpoint step %d in %s has no %s (half-written); deleting it.',
                        step, self.directory, COMMIT_MARKER)
        self._mngr.delete(step)

  # -- queries --------------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def best_step(self) -> int | None:
    """Best step by `best_metric` among those that recorded it; None if none did."""
    return self._mngr.best_step()

  # -- save -----------------------------------------------------------------------------------

  def _check_async_error(self, block: bool):
    """Raises the failure of the last asynchronous save, once, as soon as it is known."""
    if self._in_flight is None:
      return
    if not block and self._mngr.is_saving_in_progress():
      return
    step, self._in_flight = self._in_flight, None
    try:
      self._mngr.wait_until_finished()
    except Exception as e:
      self._mngr.reload()  # orbax already dropped the steps it meant to delete from its list
      raise CheckpointError(f'Saving checkpoint step {step} in {self.directory} failed: '
                            f'{_brief(e)}. The previous checkpoint is kept.') from e

  def save(self, step: int, state, *, metadata: dict, metrics: dict | None = None,
           force: bool = False, tokenizer: dict[str, str] | None = None) -> bool:
    """Starts saving `state` at `step`; returns whether it did. Raises an earlier save's failure.
    `tokenizer`: the tokenizer's files ({name: text}), saved as the step's 'tokenizer' item."""
    if self._read_only:
      raise CheckpointError(f'{self.directory} was opened read-only')
    self._check_async_error(block=False)
    if step in self._mngr.all_steps():
      logging.info('Checkpoint step %d already exists in %s; not saving it again.',
                   step, self.directory)
      return False
    if not force and not self._mngr.should_save(step):
      return False
    if clash := set(metadata) & set(_RESERVED_META):
      raise ValueError(f'metadata keys {sorted(clash)} are reserved for the checkpointer')
    tic = time.perf_counter()
    self._check_async_error(block=True)
    metrics = _scalars(metrics)
    ranked = metrics if math.isfinite(metrics.get(self.best_metric, math.nan)) else None
    meta = {**config_lib.json_ready(metadata), 'versions': versions(), 'state_sha256': digest(state),
            'checkpoint_info': {'step': step, 'process_count': jax.process_count(),
                                'saved_at': time.time(),
                                'metrics': metrics}}
    items = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
    if tokenizer is not None:
      items[TOKENIZER] = ocp.args.JsonSave(tokenizer)
    try:
      self._mngr.save(step, args=ocp.args.Composite(**items), metrics=ranked, force=True)
    except Exception as e:
      self._mngr.reload()
      raise CheckpointError(f'Saving checkpoint step {step} in {self.directory} failed: '
                            f'{_brief(e)}. The previous checkpoint is kept.') from e
    self._in_flight = step
    self.last_blocking_s = time.perf_counter() - tic
    logging.info('Checkpoint step %d: %.3fs blocking (%s).', step, self.last_blocking_s,
                 'writing in the background' if self._mngr.is_saving_in_progress() else 'done')
    return True

  def wait(self):
    """Blocks until the last save is on disk; raises CheckpointError if it failed."""
    self._check_async_error(block=True)

  def close(self):
    if self._closed:
      return
    self._closed = True
    try:
      self._check_async_error(block=True)
    finally:
      self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # -- restore --------------------------------------------------------------------------------

  def restore(self, abstract_state=None, *, step: int | None = None) -> tuple[Any, dict] | None:
    """Returns (state, metadata) of the newest usable checkpoint, or None if there is none.

    `abstract_state` is a pytree of jax.ShapeDtypeStruct with shardings: arrays are restored
    straight into those shardings, whatever the saved ones were (None: the saved tree of dicts and
    lists, on one local device). A corrupt or unreadable newest checkpoint is logged, moved aside
    and the previous one is used; with an explicit `step`, it raises CheckpointError instead.
    """
    self._check_async_error(block=True)
    self._mngr.reload()
    steps = sorted(self._mngr.all_steps(), reverse=True)
    if step is not None:
      if step not in steps:
        raise CheckpointError(f'No checkpoint step {step} in {self.directory} (has {steps}).')
      steps = [step]
    if not steps:
      return None
    for s in steps:
      reason = 'unusable on another process'
      try:
        state, meta = self._load_verified(s, abstract_state)
        ok = True
      except _Unusable as e:
        reason, ok = str(e), False
      if _all_processes_agree(ok):
        logging.info('Restored checkpoint step %d from %s (sha256 %s).',
                     s, self.directory, meta['state_sha256'])
        return state, meta
      if step is not None:
        raise CheckpointError(f'Checkpoint step {s} in {self.directory} is unusable: {reason}')
      logging.error('Checkpoint step %d in %s is unusable, falling back to an older one: %s',
                    s, self.directory, reason)
      self._set_aside(s)
    raise CheckpointError(f'None of the checkpoints {steps} in {self.directory} is usable; '
                          'see the errors above.')

  def _load_verified(self, step, abstract_state):
    """Restores one step and checks it against its recorded digest. Raises _Unusable."""
    if not (self._step_dir(step) / COMMIT_MARKER).exists():
      raise _Unusable(f'no {COMMIT_MARKER} (half-written)')
    try:
      meta, saved_tree = self._read_meta(step)
      expected = meta['state_sha256']
    except Exception as e:  # noqa: BLE001 -- anything unreadable means this step is unusable
      raise _Unusable(f'cannot read its metadata: {_brief(e)}') from e
    if abstract_state is None:  # the saved tree, no model needed
      abstract_state = _host_target(saved_tree)
    else:
      # A model that no longer matches is a usage error, not corruption: never fall back for it.
      want, have = _signature(abstract_state), _signature(saved_tree)
      if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))[:3]
        raise CheckpointError(f'Checkpoint step {step} in {self.directory} does not match the '
                              f'state to restore (path, (shape, dtype)) differences: {diff}')
    try:
      state = self._read_state(step, abstract_state)
    except Exception as e:  # noqa: BLE001
      raise _Unusable(f'cannot read its arrays: {_brief(e)}') from e
    if (got := digest(state)) != expected:
      raise _Unusable(f'state sha256 mismatch: recorded {expected}, restored arrays give {got}')
    if (saved_versions := meta.get('versions')) != versions():
      logging.warning('Checkpoint step %d was written with %s; running %s.',
                      step, saved_versions, versions())
    return state, meta

  def metadata(self, step: int) -> dict:
    """The JSON metadata (config, versions, ...) of a step, without reading or checking arrays."""
    return self._read_meta(step)[0]

  def tokenizer(self, step: int) -> dict[str, str] | None:
    """The tokenizer files saved with a step ({name: text}); None if it was saved without."""
    if not (self._step_dir(step) / TOKENIZER).exists():
      return None
    args = ocp.args.Composite(**{TOKENIZER: ocp.args.JsonRestore()})
    return self._mngr.restore(step, args=args)[TOKENIZER]

  def _read_meta(self, step: int) -> tuple[dict, Any]:
    """Our JSON metadata and orbax's saved tree of array metadata (shapes, dtypes)."""
    meta = self._mngr.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
    return meta[META], self._mngr.item_metadata(step)[STATE].tree

  def _read_state(self, step: int, target):
    args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(target)})
    return self._mngr.restore(step, args=args)[STATE]

  def _set_aside(self, step: int):
    """Renames an unusable step out of orbax's sight, so it is neither resumed nor overwritten."""
    if self._read_only:
      return
    target = self.directory / f'{step}.corrupt-{int(time.time())}'
    if jax.process_index() == 0:
      self._step_dir(step).rename(target)
      logging.warning('Moved unusable checkpoint step %d to %s.', step, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'mlm_jax_checkpoint_set_aside_{step}')
    self._mngr.reload()


def read_checkpoint(directory, step: int | None = None) -> tuple[int, dict, dict]:
  """(step, state on one local device, metadata) of a checkpoint; read-only, not verified."""
  ckpt = Checkpointer(directory, read_only=True)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'No checkpoint in {directory}')
    meta, saved_tree = ckpt._read_meta(step)
    return step, ckpt._read_state(step, _host_target(saved_tree)), meta
  finally:
    ckpt.close()
