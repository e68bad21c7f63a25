"""Metrics: sums plus denominators turned into values on the host, and the writers.

The train step returns sums (loss over masked slots, correct predictions, slot weights, real tokens);
averages are taken here, after summing over steps, so a log line is the exact average over every
masked token of the interval, whatever the batch, accumulation or device split was.
"""
import io
import json
import math
import os
import time

import jax
import numpy as np
from absl import logging
from etils import epath

from mlm_jax import paths

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
  """metrics.jsonl + TensorBoard + console (+ W&B), on process 0 only. The run directory may be
  local or on an object store (gs://); see _JsonlLog for how metrics.jsonl survives a kill there."""

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
    # A resumed run rewrites the steps after its checkpoint.
    self.jsonl = _JsonlLog(os.path.join(workdir, METRICS_FILE), resume_step)
    self.tb = _EventFile(workdir, resume_step)

  def write(self, step: int, values: dict):
    if not self.enabled:
      return
    row = {'step': int(step), **{k: float(v) for k, v in values.items()}}
    self.jsonl.write(json.dumps(row) + '\n')
    self.tb.write(int(step), row)
    if self.wandb:
      self.wandb.write(step, values)
    logging.info('step %d: %s', step, ', '.join(f'{k}={_fmt(v)}' for k, v in values.items()))

  def flush(self):
    """Every row written so far is in metrics.jsonl when this returns. Called before a checkpoint
    is saved: a run resumed from it then finds every row up to its step."""
    if self.jsonl:
      self.jsonl.flush()
      self.tb.flush()

  def close(self):
    """Closes the outputs. A failure here (a full disk) is logged, not raised: raised from the
    train loop's cleanup it would replace the error that ended the run."""
    for name, out in (('metrics.jsonl', self.jsonl), ('TensorBoard events', self.tb),
                      ('W&B', self.wandb)):
      if out is None:
        continue
      try:
        out.close()
      except OSError as e:
        logging.error('closing %s failed: %s', name, e)


METRICS_FILE = 'metrics.jsonl'


def _fmt(v):
  return f'{v:.4g}' if isinstance(v, float) else str(v)


def _kept_rows(text: str, step: int) -> list[str]:
  """The complete rows of `step` or earlier: later ones belong to work a restart redoes exactly,
  and a line cut short by a kill is no row."""
  keep = []
  for line in text.splitlines(keepends=True):
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if row.get('step', 0) <= step:
      keep.append(line if line.endswith('\n') else line + '\n')
  return keep


class _JsonlLog:
  """metrics.jsonl, one row per line, never a torn or repeated row after a kill and a resume.

  On a local disk each row is appended and flushed; a resume drops the rows after its step and
  the cut last line (rewritten whole, then renamed over the file). An object store cannot append
  (gcsfs's 'a' mode silently overwrites), but an object write is atomic: the rows are kept in
  memory and the whole object is written at most every _UPLOAD_EVERY_S seconds, at `flush()` and
  at `close()`. A kill loses only rows after the last upload; the train loop flushes before every
  checkpoint, so those are all after the checkpoint a resume starts from, and it logs them again.
  """

  _UPLOAD_EVERY_S = 30.0

  def __init__(self, path: str, resume_step: int):
    self.path = path
    self.local = paths.is_local(path)
    p = epath.Path(path)
    kept = _kept_rows(p.read_bytes().decode('utf-8'), resume_step) if p.exists() else []
    if self.local:
      if p.exists():
        paths.write_atomic(path, ''.join(kept))
      self._f = open(path, 'a')  # pylint: disable=consider-using-with
    else:
      self._rows, self._uploaded, self._last_upload = kept, len(kept), time.monotonic()
      if p.exists():
        self._upload()

  def write(self, line: str):
    if self.local:
      self._f.write(line)
      self._f.flush()
      return
    self._rows.append(line)
    if time.monotonic() - self._last_upload >= self._UPLOAD_EVERY_S:
      self._upload()

  def _upload(self):
    paths.write_atomic(self.path, ''.join(self._rows))
    self._uploaded, self._last_upload = len(self._rows), time.monotonic()

  def flush(self):
    if not self.local and self._uploaded < len(self._rows):
      self._upload()

  def close(self):
    if self.local:
      self._f.close()
    else:
      self.flush()


class _EventFile:
  """TensorBoard scalars, written in the caller's thread and flushed (with fsync) at most every
  _JsonlLog._UPLOAD_EVERY_S, at flush and at close. Not tensorboardX's SummaryWriter: it writes
  from a thread that dies on a write error (a full disk), after which add_scalar blocks forever on
  its bounded queue and training hangs; here the error reaches the train loop."""

  def __init__(self, workdir: str, resume_step: int = 0):
    from tensorboardX import event_file_writer, record_writer  # only process 0 needs them
    from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
    if not paths.is_local(workdir):
      scheme = workdir.split('://', 1)[0]
      record_writer.register_writer_factory(scheme, _EpathRecordWriterFactory())
    self._events = event_file_writer.EventsWriter(os.path.join(workdir, 'events'))
    if resume_step:
      # A resumed run logs the steps after its checkpoint again. A SessionLog START at step s makes
      # TensorBoard drop every earlier event at a step >= s (points a killed run logged after its
      # last checkpoint), so no step shows twice and no stale point stays.
      self._events.write_event(event_pb2.Event(
          wall_time=time.time(), step=resume_step + 1,
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
    self._flushed = time.monotonic()

  def write(self, step: int, row: dict):
    from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
    from tensorboardX.summary import scalar  # pylint: disable=import-outside-toplevel
    now = time.time()
    for k, v in row.items():
      if k != 'step':
        self._events.write_event(event_pb2.Event(wall_time=now, step=step, summary=scalar(k, v)))
    if time.monotonic() - self._flushed >= _JsonlLog._UPLOAD_EVERY_S:
      self.flush()

  def flush(self):
    self._events.flush()
    self._flushed = time.monotonic()

  def close(self):
    self._events.close()


class _EpathRecordWriter:
  """An event file on an object store: buffered, and written whole at each flush (there is no
  append; tensorboardX flushes every two minutes and at close)."""

  def __init__(self, path: str):
    self.path, self.buffer, self.written = path, io.BytesIO(), -1

  def write(self, data: bytes):
    self.buffer.write(data)

  def flush(self):
    if self.buffer.tell() != self.written:
      paths.write_atomic(self.path, self.buffer.getvalue())
      self.written = self.buffer.tell()

  def close(self):
    self.flush()


class _EpathRecordWriterFactory:
  """tensorboardX's writer factory interface, over epath (replaces its google-cloud-storage one)."""

  def open(self, path: str):
    return _EpathRecordWriter(path)

  def directory_check(self, path: str):
    epath.Path(path).mkdir(parents=True, exist_ok=True)
