"""Metrics: sums plus denominators turned into values on the host, and the writers.

The train step returns sums (loss over masked slots, correct predictions, slot weights, real tokens);
averages are taken here, after summing over steps, so a log line is the exact average over every
masked token of the interval, whatever the batch, accumulation or device split was.
"""
import json
import math
import os
import time

import jax
import numpy as np
from absl import logging

SUM_KEYS = ('loss_sum', 'correct_sum', 'weight_sum', 'tokens')


class Accumulator:
  """Adds step metrics (host numpy scalars) until `summary()` turns them into values."""

  def __init__(self):
    self.reset()

  def reset(self):
    self.sums = {k: 0.0 for k in SUM_KEYS}
    self.grad_norms, self.steps = [], 0
    self.skipped = 0  # non-finite steps whose update was not applied (train.nonfinite=skip)
    self.timed_steps, self.timed_tokens = 0, 0.0
    self.start = time.perf_counter()
    self.excluded = 0.0  # seconds spent compiling, evaluating or checkpointing: not training speed

  def exclude(self, seconds: float):
    self.excluded += seconds

  def restart_clock(self):
    """Time from now on (after the first step: its compile is not training speed)."""
    self.start, self.excluded, self.timed_steps, self.timed_tokens = time.perf_counter(), 0.0, 0, 0.0

  def train_seconds(self) -> float:
    return time.perf_counter() - self.start - self.excluded

  def add(self, m):
    self.timed_tokens += float(m['tokens'])
    self.timed_steps += 1
    self.steps += 1
    if m['nonfinite']:  # its loss is not a number: count the step, keep it out of the averages
      self.skipped += 1
      return
    for k in SUM_KEYS:
      self.sums[k] += float(m[k])
    self.grad_norms.append(float(m['grad_norm']))

  def summary(self, prefix='train'):
    s = self.sums
    loss = s['loss_sum'] / max(s['weight_sum'], 1.0)
    out = {f'{prefix}/loss': loss,
           f'{prefix}/accuracy': s['correct_sum'] / max(s['weight_sum'], 1.0),
           f'{prefix}/perplexity': math.exp(min(loss, 50.0))}
    if self.grad_norms:
      out[f'{prefix}/grad_norm'] = float(np.mean(self.grad_norms))
    if self.skipped:
      out[f'{prefix}/skipped_updates'] = float(self.skipped)
    return out


def eval_summary(sums: dict) -> dict:
  loss = sums['loss_sum'] / max(sums['weight_sum'], 1.0)
  return {'eval/loss': loss, 'eval/accuracy': sums['correct_sum'] / max(sums['weight_sum'], 1.0),
          'eval/perplexity': math.exp(min(loss, 50.0)), 'eval/masked_tokens': sums['weight_sum']}


# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets.
_PEAK_FLOPS = {'h100': 989e12, 'h200': 989e12, 'a100': 312e12, 'l4': 121e12,
               'tpu v4': 275e12, 'tpu v5 lite': 197e12, 'tpu v5e': 197e12, 'tpu v5p': 459e12,
               'tpu v6': 918e12}


def peak_flops_per_device(config_value: float) -> float:
  """The config's value, else the table by device kind, else (CPU) a quick fp32 matmul measurement."""
  if config_value > 0:
    return config_value
  device = jax.devices()[0]
  kind = device.device_kind.lower()
  for name, flops in _PEAK_FLOPS.items():
    if name in kind:
      return flops
  return measure_matmul_flops(device)


def measure_matmul_flops(device, n=1024, repeats=5) -> float:
  x = jax.device_put(np.ones((n, n), np.float32), device)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    t = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


class Writer:
  """metrics.jsonl + TensorBoard + console, on process 0 only."""

  def __init__(self, workdir: str, enabled: bool, resume_step: int = 0, wandb_project: str = '',
               config: dict | None = None):
    self.enabled = enabled
    self.jsonl = None
    self.tb = None
    self.wandb = None
    if not enabled:
      return
    from mlm_jax import wandb_writer
    self.wandb = wandb_writer.make_writer(wandb_project, workdir, config)
    path = os.path.join(workdir, 'metrics.jsonl')
    _truncate_after(path, resume_step)  # a resumed run rewrites the steps after its checkpoint
    self.jsonl = open(path, 'a')
    from tensorboardX import SummaryWriter  # imported here: only process 0 needs it
    self.tb = SummaryWriter(workdir)

  def write(self, step: int, values: dict):
    if not self.enabled:
      return
    row = {'step': int(step), **{k: float(v) for k, v in values.items()}}
    self.jsonl.write(json.dumps(row) + '\n')
    self.jsonl.flush()
    for k, v in values.items():
      self.tb.add_scalar(k, float(v), int(step))
    if self.wandb:
      self.wandb.write(step, values)
    logging.info('step %d: %s', step, ', '.join(f'{k}={_fmt(v)}' for k, v in values.items()))

  def close(self):
    if self.jsonl:
      self.jsonl.close()
      self.tb.close()
    if self.wandb:
      self.wandb.close()


def _fmt(v):
  return f'{v:.4g}' if isinstance(v, float) else str(v)


def _truncate_after(path: str, step: int):
  """Drop rows logged after `step`: they belong to work the restart will redo exactly."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line cut by a kill
    if row.get('step', 0) <= step:
      keep.append(line if line.endswith('\n') else line + '\n')
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(keep)
  os.replace(tmp, path)
