"""Gradient accumulation chosen at compile time to fit device memory, and readable out-of-memory errors.

`pick_grad_accum` compiles the train step for the accumulation counts that split the global batch
evenly over the devices, smallest first (largest micro-batch = fastest), and returns the first whose
compiled memory fits the device's limit. Backends without a memory limit (CPU) get the smallest
without compiling anything. Each candidate tried costs one compile, so the common case (the first
fits) costs nothing extra: that program is the one training runs.
"""
from typing import Any, Callable

import jax

# Leave this fraction of the device's limit for what the compiled program does not count: the
# allocator's fragmentation, eval-step buffers, checkpoint copies.
DEFAULT_HEADROOM = 0.9


class OutOfMemory(RuntimeError):
  """No setting tried fits; the message names the config fields to change."""


def candidate_accums(batch_size: int, num_devices: int) -> list[int]:
  """Accumulation counts a (ascending) with batch_size / a sequences splitting evenly over devices."""
  return [a for a in range(1, batch_size + 1)
          if batch_size % a == 0 and (batch_size // a) % num_devices == 0]


def memory_limit_bytes(device=None) -> int | None:
  """The device's allocatable bytes (GPU/TPU `memory_stats()['bytes_limit']`); None on CPU."""
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 -- some backends raise instead of returning None
    return None
  return int(stats['bytes_limit']) if stats and 'bytes_limit' in stats else None


def compiled_bytes(compiled) -> int | None:
  """Peak device bytes of one call of a compiled program: inputs + outputs (donated inputs counted
  once) + temporaries. None where the backend has no memory analysis."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)


def is_resource_exhausted(error: BaseException) -> bool:
  """True for XLA's out-of-memory errors (at compile time or when a step allocates)."""
  return 'RESOURCE_EXHAUSTED' in str(error) or 'Out of memory' in str(error)


def oom_message(config, detail: str = '') -> str:
  """What to change when a step does not fit: the config fields, with values to try."""
  t, m = config.train, config.model
  accum = t.grad_accum_steps if isinstance(t.grad_accum_steps, int) else 1
  bigger = [a for a in candidate_accums(t.batch_size, jax.device_count()) if a > accum]
  lines = [f'the train step does not fit in device memory{": " + detail if detail else ""}.',
           'Change one of (each trades speed for memory):']
  if bigger:
    lines.append(f'  train.grad_accum_steps: {accum} -> {bigger[0]} (or "auto"; same results, '
                 'smaller micro-batches)')
  if m.remat_policy != 'full':
    nxt = 'save_dots' if m.remat_policy == 'none' else 'full'
    lines.append(f'  model.remat_policy: {m.remat_policy!r} -> {nxt!r} (recompute activations in '
                 'the backward pass; same results)')
  if m.dtype != 'bfloat16':
    lines.append(f"  model.dtype: {m.dtype!r} -> 'bfloat16' (half the activation memory)")
  lines.append(f'  train.batch_size: {t.batch_size} -> {max(t.batch_size // 2, 1)} '
               '(changes the optimization; retune the learning rate)')
  return '\n'.join(lines)


def pick_grad_accum(compile_step: Callable[[int], Any], batch_size: int, num_devices: int,
                    memory_limit: int | None = None, headroom: float = DEFAULT_HEADROOM,
                    config=None) -> int:
  """The smallest accumulation count whose compiled train step fits `headroom * memory_limit`.

  compile_step(a) returns the compiled step (`jitted.lower(...).compile()`) for grad_accum_steps=a.
  memory_limit: bytes per device; None = ask the first local device (CPU: no limit, so the
  smallest count is returned without compiling). Raises OutOfMemory (naming the config fields to
  change when `config` is given) if no count fits.
  """
  candidates = candidate_accums(batch_size, num_devices)
  if not candidates:
    raise OutOfMemory(f'train.batch_size {batch_size} does not split over {num_devices} devices')
  limit = memory_limit if memory_limit is not None else memory_limit_bytes()
  if limit is None:
    return candidates[0]
  budget = headroom * limit
  tried = []
  for a in candidates:
    try:
      need = compiled_bytes(compile_step(a))
    except Exception as e:  # noqa: BLE001 -- an out-of-memory at compile time: try the next count
      if not is_resource_exhausted(e):
        raise
      tried.append(f'{a}: out of memory while compiling')
      continue
    if need is None or need <= budget:
      return a
    tried.append(f'{a}: {need / 2**30:.2f} GiB')
  detail = (f'no train.grad_accum_steps fits {budget / 2**30:.2f} GiB '
            f'({headroom:.0%} of {limit / 2**30:.2f} GiB); tried {"; ".join(tried)}')
  raise OutOfMemory(oom_message(config, detail) if config is not None else detail)
