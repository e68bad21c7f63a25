"""The training loop: build everything from the config, resume if a checkpoint exists, train, evaluate.

`train_and_evaluate(config, workdir)` is the whole program; `main.py` only parses flags. It reads as
its parts: `_prepare` (check and copy the config), `_restore_or_init` (the newest usable checkpoint,
else fresh parameters), `_resolve_grad_accum` ('auto' accumulation), then `_Loop` (steps, logging,
eval, saves, stopping).
"""
import contextlib
import dataclasses
import math
import os
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from mlm_jax import autotune
from mlm_jax import checkpoint as ckpt
from mlm_jax import config as config_lib
from mlm_jax import data
from mlm_jax import init_from
from mlm_jax import metrics as metrics_lib
from mlm_jax import model as model_lib
from mlm_jax import optim
from mlm_jax import paths
from mlm_jax import preemption as preemption_lib
from mlm_jax import rundir
from mlm_jax import sharding as shd
from mlm_jax import steps


class TrainingHalted(RuntimeError):
  """Raised when training cannot go on (non-finite loss, out of memory); the message says why and
  where."""


def build_model(config, backend: str | None = None):
  """(graphdef, abstract params, BertConfig) without allocating the parameters."""
  dtype = config_lib.resolve_dtype(config.model.dtype, backend or jax.default_backend())
  cfg = model_lib.BertConfig.from_config(config.model, dtype)
  abstract = nnx.eval_shape(lambda: model_lib.build(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract)
  return graphdef, abstract_params, cfg


class Trainer:
  """Holds the compiled steps, the sharded state and the mesh; `train_and_evaluate` drives it."""

  def __init__(self, config, workdir: str | None = None, devices=None):
    """`devices`: the mesh's devices (default: all of them)."""
    self.config, self.workdir = config, workdir
    self.mesh = shd.make_mesh(config, devices)
    self.graphdef, abstract_params, self.model_cfg = build_model(config)
    if config.model.remat_policy != 'none' and not config.model.scan_layers:
      logging.warning('model.remat_policy=%s without model.scan_layers=True: XLA may schedule the '
                      'recomputation early and save little memory (on CPU ~5%%, with scan 65-75%%)',
                      config.model.remat_policy)
    self.optimizer = optim.make_optimizer(config)
    self.schedule = optim.learning_rate_schedule(config)

    def init(key):
      model = model_lib.build(self.model_cfg, rngs=nnx.Rngs(params=key))
      return steps.init_state(nnx.state(model), self.optimizer, config.seed)

    abstract_state = jax.eval_shape(init, jax.random.key(config.seed))
    self.state_shardings = shd.state_shardings(abstract_state, self.mesh)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state,
        self.state_shardings)
    # Created directly in its shards: a large model never sits whole on one device.
    self._init = jax.jit(init, out_shardings=self.state_shardings)
    self.param_counts = model_lib.count_params(abstract_state['params'])
    self.batch_keys = None
    self._train_step = self._eval_step = None
    self._full_rows = None  # local rows of a whole step's batch (grad_accum_steps micro-batches)
    self._ramp_steps = {}  # micro-batches -> the step compiled for them (the batch-size ramp)
    self.compile_seconds = 0.0  # spent compiling ramp steps on first use (not training speed)

  def init_state(self):
    return self._init(jax.random.key(self.config.seed))

  def compile_train_step(self, local_batch: dict, grad_accum_steps: int):
    """The train step compiled ahead of time for batches shaped like `local_batch`."""
    config = self.config.copy_and_resolve_references()
    config.train.grad_accum_steps = grad_accum_steps
    jitted = steps.jit_train_step(self.graphdef, self.optimizer, self.schedule, config, self.mesh,
                                  self.state_shardings, tuple(sorted(local_batch)))
    return steps.compile_ahead(jitted, self.abstract_state,
                               shd.abstract_batch(local_batch, self.mesh))[0]

  def _compile_eval_step(self, local_batch: dict):
    jitted = steps.jit_eval_step(self.graphdef, self.mesh, self.state_shardings['params'],
                                 tuple(sorted(local_batch)),
                                 self.config.sharding.fixed_order_reduction)
    return steps.compile_ahead(jitted, self.abstract_state['params'],
                               shd.abstract_batch(local_batch, self.mesh))[0]

  def compile_steps(self, local_batch: dict):
    """Compiles the train and eval steps ahead of time for batches shaped like `local_batch` (a
    whole step's batch: arrays or ShapeDtypeStructs); logs the time it took."""
    tic = time.perf_counter()
    self.batch_keys = tuple(sorted(local_batch))
    self._full_rows = local_batch['input_ids'].shape[0]
    self._eval_step = self._compile_eval_step(local_batch)
    if not config_lib.is_auto_accum(self.config.train.grad_accum_steps):
      self._train_step = self.compile_train_step(local_batch, self.config.train.grad_accum_steps)
    logging.info('compiled the steps in %.1fs', time.perf_counter() - tic)

  @property
  def compiled_train_step(self):
    """The compiled train step (memory analysis, HLO text) after `compile_steps`."""
    return self._train_step

  def train_step(self, state, local_batch):
    """One optimizer step. A batch with fewer rows than a whole one (the batch-size ramp) holds
    fewer micro-batches of the same shape; its step is compiled on first use, once per count."""
    rows = local_batch['input_ids'].shape[0]
    step = self._train_step if rows == self._full_rows else self._ramp_step(local_batch, rows)
    return step(state, shd.global_batch(local_batch, self.mesh))

  def _ramp_step(self, local_batch, rows):
    full = self.config.train.grad_accum_steps
    k, rest = divmod(rows * full, self._full_rows)
    if rest or not 0 < k < full:
      raise ValueError(f'a batch of {rows} rows is not a whole number of micro-batches '
                       f'({self._full_rows // full} rows each)')
    if k not in self._ramp_steps:
      tic = time.perf_counter()
      self._ramp_steps[k] = self.compile_train_step(local_batch, k)
      seconds = time.perf_counter() - tic
      self.compile_seconds += seconds
      logging.info('compiled the train step for %d of %d micro-batches in %.1fs', k, full, seconds)
    return self._ramp_steps[k]

  def evaluate(self, params, batches) -> dict:
    def compiled(local_batch):
      if self._eval_step is None:
        self._eval_step = self._compile_eval_step(local_batch)
      return self._eval_step
    return metrics_lib.eval_summary(
        steps.run_eval(params, batches, mesh=self.mesh, compile_for=compiled))


class _QuietLibraries:
  """absl log filter: INFO lines from orbax/grain/tensorstore internals are noise for a user."""
  _NOISY = ('/orbax/', '/grain/', '/tensorstore/', '/etils/')

  def filter(self, record):
    return record.levelno >= 30 or not any(p in record.pathname for p in self._NOISY)


def quiet_library_logs():
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())


# ---------------------------------------------------------------------------------------------
# The program.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_after: int | None = None) -> dict:
  """Trains (resuming from the newest checkpoint in workdir if any); returns the last metrics.

  `stop_after=N` stops at step N as a preemption would (checkpoint, then return): a notebook can
  train in slices, and tests interrupt runs at a chosen step.
  """
  config, workdir = _prepare(config, workdir)
  is_main = jax.process_index() == 0
  tokenizer = data.build_tokenizer(config)  # checks model.vocab_size against the vocabulary
  trainer = Trainer(config, workdir)  # checks the mesh against the devices
  paths.makedirs(workdir)  # only now: a rejected config writes nothing
  logging.info('model: %s parameters (%s in the encoder blocks), compute dtype %s, mesh %s',
               f"{trainer.param_counts['total']:,}", f"{trainer.param_counts['encoder']:,}",
               trainer.model_cfg.dtype, dict(trainer.mesh.shape))
  with contextlib.ExitStack() as stack:
    train_iter = data.train_iterator(config, tokenizer, process_index=jax.process_index(),
                                     process_count=jax.process_count())
    stack.callback(train_iter.close)
    k = config.checkpoint
    checkpointer = ckpt.Checkpointer(
        os.path.join(workdir, 'checkpoints'), keep=k.keep, keep_best=k.keep_best,
        best_metric=k.best_metric, best_mode=k.best_mode, async_save=k.async_save)
    stack.callback(checkpointer.close)
    state, start_step, meta = _restore_or_init(config, trainer, checkpointer, train_iter,
                                               tokenizer)
    first_batch = next_batch(config, train_iter, start_step)
    _resolve_grad_accum(config, trainer, first_batch)
    resolved = config.to_dict()
    resolved['model']['dtype'] = trainer.model_cfg.dtype
    if is_main:
      paths.write_json(os.path.join(workdir, 'config.json'), resolved)  # whole or not at all
      tokenizer.save(os.path.join(workdir, 'tokenizer'))
    trainer.compile_steps(_whole_batch_like(first_batch, config, start_step))
    writer = metrics_lib.Writer(workdir, enabled=is_main, resume_step=start_step,
                                wandb_project=config.train.wandb_project, config=resolved)
    stack.callback(writer.close)
    preemption = preemption_lib.install()
    stack.callback(preemption.uninstall)
    loop = _Loop(config, resolved, workdir, trainer, tokenizer, train_iter, checkpointer, writer,
                 preemption, EarlyStopping(config.train.early_stopping_patience, k.best_mode,
                                           meta.get('early_stopping')))
    return loop.run(state, start_step, first_batch, stop_after)


def _prepare(config, workdir: str):
  """Validated private copy of the config ('auto' accumulation as 0, 'auto' batch size picked for
  the backend: jax.distributed has started by now) and the absolute workdir."""
  config_lib.validate(config)
  quiet_library_logs()
  workdir = paths.absolute(workdir)
  if config.train.compilation_cache_dir:  # a restarted run loads its programs instead of compiling
    jax.config.update('jax_compilation_cache_dir',
                      os.path.expanduser(config.train.compilation_cache_dir))
  values = config.to_dict()
  if config_lib.is_auto_accum(values['train']['grad_accum_steps']):
    values['train']['grad_accum_steps'] = 0  # an int field, so the count picked can replace it
  values['train']['batch_size'] = config_lib.resolve_batch_size(values['train']['batch_size'],
                                                                jax.default_backend())
  return ml_collections.ConfigDict(values), workdir


def _restore_or_init(config, trainer, checkpointer, train_iter, tokenizer):
  """(state, step, metadata) of the newest usable checkpoint, or a fresh state at step 0 (its
  params from train.init_from if set: init_from.py).

  A changed config is refused before any array is read; with grad_accum_steps='auto' a resumed run
  keeps the count its checkpoint was trained with."""
  latest = checkpointer.latest_step()
  if latest is not None:
    try:
      saved_config = checkpointer.metadata(latest)['config']
    except Exception:  # noqa: BLE001 -- unreadable: restore() below falls back and says why
      saved_config = None
    if saved_config is not None:
      if config_lib.is_auto_accum(config.train.grad_accum_steps):
        config.train.grad_accum_steps = saved_config['train']['grad_accum_steps']
      current = config.to_dict()
      current['model']['dtype'] = trainer.model_cfg.dtype
      config_lib.validate_resume(saved_config, current,
                                 allow_inexact=config.train.allow_inexact_resume)
  restored = checkpointer.restore(trainer.abstract_state)
  if restored is None:
    state = trainer.init_state()
    if config.train.init_from:
      state = init_from.apply(config.train.init_from, config, state, trainer.state_shardings,
                              tokenizer)
    return state, 0, {}
  state, meta = restored
  step = int(jax.device_get(state['step']))
  if config.train.init_from:
    logging.info('train.init_from ignored: the run resumes from its own checkpoint')
  if meta.get('data_state'):
    train_iter.set_state(meta['data_state'])
  else:
    logging.warning('checkpoint step %d has no input position: the input starts from the '
                    'beginning (e.g. a checkpoint made by tools/import_hf.py)', step)
  if config_lib.is_auto_accum(config.train.grad_accum_steps):
    config.train.grad_accum_steps = meta['config']['train']['grad_accum_steps']
  logging.info('resumed from step %d', step)
  return state, step, meta


def _resolve_grad_accum(config, trainer, local_batch):
  """grad_accum_steps='auto': the fewest micro-batches whose compiled step fits device memory."""
  t = config.train
  if not config_lib.is_auto_accum(t.grad_accum_steps):
    return
  limit = t.device_memory_limit or None
  t.grad_accum_steps = autotune.pick_grad_accum(
      lambda a: trainer.compile_train_step(local_batch, a), t.batch_size, jax.device_count(),
      memory_limit=limit, config=config)
  trainer.config.train.grad_accum_steps = t.grad_accum_steps
  logging.info("train.grad_accum_steps='auto': %d micro-batches per step", t.grad_accum_steps)


def next_batch(config, train_iter, step: int) -> dict:
  """This process's rows for optimizer step `step` (0-based): the whole batch, or during the
  batch-size ramp the rows of steps.micro_batches(step) of its grad_accum_steps micro-batches.
  The input position after step s is then a pure function of s, as exact resume needs."""
  t = config.train
  k = steps.micro_batches(t, step)
  if k == t.grad_accum_steps:
    return next(train_iter)
  return train_iter.next_part(k, t.grad_accum_steps)


def _whole_batch_like(local_batch, config, step: int) -> dict:
  """Shapes of a whole step's batch, from step `step`'s batch (fewer rows during the ramp)."""
  k, full = steps.micro_batches(config.train, step), config.train.grad_accum_steps
  if k == full:
    return local_batch
  return {key: jax.ShapeDtypeStruct((v.shape[0] // k * full, *v.shape[1:]), v.dtype)
          for key, v in local_batch.items()}


def _gathered_input_state(train_iter) -> dict:
  """Every process's input shard positions, so any process layout can resume from them.

  Kept in the checkpoint's JSON metadata rather than in per-process files: a checkpoint written
  by 2 processes must resume in 1 (and the other way round), and every process needs the whole map.
  """
  local = train_iter.get_state()
  if jax.process_count() == 1:
    return local
  rows_S3 = np.array([[int(s), v['chunk'], v['row']] for s, v in local['shards'].items()], np.int32)
  every_S3 = multihost_utils.process_allgather(rows_S3).reshape(-1, 3)
  return {'num_shards': local['num_shards'],
          'shards': {str(s): {'chunk': int(c), 'row': int(r)} for s, c, r in every_S3.tolist()}}


@dataclasses.dataclass
class _Loop:
  """The step loop. Step t's metrics are fetched after step t+1 is dispatched (the device never
  waits for Python), except where a log, eval, save or stop needs them at once."""
  config: ml_collections.ConfigDict
  resolved: dict  # the config as recorded in config.json and every checkpoint
  workdir: str
  trainer: Trainer
  tokenizer: object
  train_iter: object
  checkpointer: ckpt.Checkpointer
  writer: metrics_lib.Writer
  preemption: preemption_lib.Preemption
  early: 'EarlyStopping'

  def __post_init__(self):
    t = self.config.train
    self.acc = metrics_lib.Accumulator()
    self.last: dict = {}
    self.nonfinite_in_a_row = 0
    self.data_wait = 0.0
    peak = metrics_lib.peak_flops_per_device(t.peak_flops) * jax.device_count()
    per_token = model_lib.model_flops_per_token(
        self.trainer.model_cfg, self.trainer.param_counts['encoder'],
        min(1.0, self.config.data.mask_rate))
    self.flops_per_token_over_peak = per_token / peak
    self.tokenizer_files = rundir.tokenizer_files(self.tokenizer)  # in every checkpoint step

  def run(self, state, start_step: int, first_batch, stop_after: int | None) -> dict:
    t = self.config.train
    is_main = jax.process_index() == 0
    bar = _progress_bar(is_main and t.progress_bar and sys.stderr.isatty(), start_step, t.steps)
    self.last_save_time = time.monotonic()
    profiler = _Profiler(t.profile_start_step, t.profile_num_steps,
                         os.path.join(self.workdir, 'profile'))
    batch, pending, step = first_batch, None, start_step
    try:
      while step < t.steps:
        tic = time.perf_counter()
        if batch is None:
          batch = first_batch if t.overfit_one_batch else next_batch(self.config, self.train_iter,
                                                                     step)
        self.data_wait += time.perf_counter() - tic
        profiler.before(step)
        compiled = self.trainer.compile_seconds
        state, step_metrics = self._dispatch(state, batch)
        self.acc.exclude(self.trainer.compile_seconds - compiled)  # a ramp step's first compile
        batch = None
        step += 1
        if pending is not None:
          self._consume(pending)
        pending = (step, step_metrics)
        if step == start_step + 1:  # the first step: report it, keep it out of the speed
          self._consume(pending)
          pending = None
          logging.info('ran the first step in %.1fs', time.perf_counter() - tic)
          self.acc.restart_clock()
          self.data_wait = 0.0
        is_last = step == t.steps
        do_log = step % t.log_every == 0 or is_last
        do_eval = t.eval_every > 0 and (step % t.eval_every == 0 or is_last)
        every = self.config.checkpoint.every
        do_save = (every > 0 and step % every == 0) or is_last or (do_log and self._save_is_due())
        stop = self.preemption.should_stop(step) or step == stop_after
        if (do_log or do_eval or do_save or stop) and pending is not None:
          self._consume(pending)
          pending = None
        if do_log:
          self._log(step, step_metrics)
          if bar:
            bar.set_postfix(loss=f"{self.last['train/loss']:.3f}",
                            lr=f"{self.last['train/learning_rate']:.2e}")
        tic = time.perf_counter()
        eval_metrics = self._evaluate(step, state) if do_eval else None
        if do_save or stop or self.early.should_stop:
          self._save(step, state, eval_metrics, force=is_last or stop or self.early.should_stop)
        profiler.after(step, step_metrics)
        self.acc.exclude(time.perf_counter() - tic)
        if bar:
          bar.update(1)
        if stop:
          self.checkpointer.wait()
          since = self.preemption.seconds_since_signal()
          logging.info('preempted: saved step %d in %s%s; run the same command to continue',
                       step, self.checkpointer.directory,
                       '' if since is None else f' ({since:.1f}s after the signal)')
          break
        if self.early.should_stop:
          break
      self.checkpointer.wait()
    finally:
      if bar:
        bar.close()
    if self.early.best_step is not None:
      logging.info('best %s = %.4g at step %d', self.config.checkpoint.best_metric,
                   self.early.best, self.early.best_step)
      self.last['best_step'] = self.early.best_step
    self.last['step'] = step
    # Device bytes of one compiled train step (None where the backend has no memory analysis).
    self.last['compiled_step_bytes'] = autotune.compiled_bytes(self.trainer.compiled_train_step)
    return self.last

  def _dispatch(self, state, batch):
    try:
      return self.trainer.train_step(state, batch)
    except Exception as e:  # noqa: BLE001 -- only out-of-memory is turned into advice
      if autotune.is_resource_exhausted(e):
        raise TrainingHalted(autotune.oom_message(self.config, str(e).splitlines()[0])) from e
      raise

  def _consume(self, pending):
    """Fetch one step's metrics and apply the non-finite policy (train.nonfinite)."""
    step, m = pending
    m = jax.device_get(m)
    self.acc.add(m)
    if not m['nonfinite']:
      self.nonfinite_in_a_row = 0
      return
    self.nonfinite_in_a_row += 1
    t = self.config.train
    loss = float(m['loss_sum']) / max(float(m['weight_sum']), 1.0)
    msg = (f'step {step}: non-finite loss ({loss}) or gradient norm ({float(m["grad_norm"])}); '
           f'the update was not applied')
    newest = self.checkpointer.latest_step()
    where = (f' The newest checkpoint is step {newest} in {self.checkpointer.directory}.'
             if newest is not None else ' No checkpoint was saved yet.')
    if t.nonfinite == 'halt':
      raise TrainingHalted(msg + '. Halting (train.nonfinite=halt): lower optimizer.learning_rate, '
                           'set optimizer.clip_norm, or use train.nonfinite=skip.' + where)
    if self.nonfinite_in_a_row >= t.max_nonfinite_in_a_row:
      raise TrainingHalted(msg + f'; {self.nonfinite_in_a_row} in a row '
                           f'(train.max_nonfinite_in_a_row={t.max_nonfinite_in_a_row}). Halting.'
                           + where)
    logging.warning(msg + ' (skipped, train.nonfinite=skip)')

  def _log(self, step, step_metrics):
    t = self.config.train
    elapsed = max(self.acc.train_seconds(), 1e-9)
    tokens_per_sec = self.acc.timed_tokens / elapsed
    self.last = {**self.acc.summary(),
                 'train/learning_rate': float(step_metrics['learning_rate']),
                 'train/tokens_per_sec': tokens_per_sec,
                 'train/step_time': elapsed / max(self.acc.timed_steps, 1),
                 'train/mfu': tokens_per_sec * self.flops_per_token_over_peak,
                 'train/data_wait_fraction': self.data_wait / elapsed}
    if t.batch_ramp_steps:  # sequences in the step just run: the ramp's progress
      self.last['train/batch_size'] = (steps.micro_batches(t, step - 1) * t.batch_size
                                       // t.grad_accum_steps)
    if self.acc.grad_norms and max(self.acc.grad_norms) > t.grad_norm_warn:
      logging.warning('step %d: gradient norm %.3g is above train.grad_norm_warn=%g',
                      step, max(self.acc.grad_norms), t.grad_norm_warn)
    self.writer.write(step, self.last)
    if not (t.progress_bar and sys.stderr.isatty()) and jax.process_index() == 0:
      eta = (t.steps - step) * self.last['train/step_time']
      logging.info('step %d/%d  loss %.4f  %s tokens/s  ETA %s', step, t.steps,
                   self.last['train/loss'], f'{tokens_per_sec:,.0f}', _duration(eta))
    self.acc.reset()
    self.data_wait = 0.0

  def _save_is_due(self) -> bool:
    """checkpoint.every_seconds has passed since the last save, as process 0's clock says (so every
    process saves the same step)."""
    limit = self.config.checkpoint.every_seconds
    if limit <= 0:
      return False
    due = time.monotonic() - self.last_save_time >= limit
    if jax.process_count() > 1:
      due = bool(multihost_utils.broadcast_one_to_all(np.int32(due)))
    return due

  def _evaluate(self, step, state) -> dict:
    t, k = self.config.train, self.config.checkpoint
    eval_metrics = self.trainer.evaluate(state['params'], data.eval_batches(
        self.config, self.tokenizer, process_index=jax.process_index(),
        process_count=jax.process_count(), max_batches=None if t.eval_steps < 0 else t.eval_steps))
    self.writer.write(step, eval_metrics)
    self.last.update(eval_metrics)
    self.early.update(step, eval_metrics.get(k.best_metric))
    if self.early.should_stop:
      logging.info('early stopping at step %d: %s did not improve for %d evaluations '
                   '(best %.4g at step %d)', step, k.best_metric, t.early_stopping_patience,
                   self.early.best, self.early.best_step)
    return eval_metrics

  def _save(self, step, state, eval_metrics, force):
    meta = {'config': self.resolved, 'step': step, 'early_stopping': self.early.state(),
            'param_counts': self.trainer.param_counts,
            'data_state': _gathered_input_state(self.train_iter)}
    self.writer.flush()  # every row up to this step is in metrics.jsonl before the step can commit
    if self.checkpointer.save(step, state, metadata=meta, metrics=eval_metrics, force=force,
                              tokenizer=self.tokenizer_files):
      self.last_save_time = time.monotonic()
      self.writer.write(step, {'checkpoint/blocking_s': self.checkpointer.last_blocking_s})


class EarlyStopping:
  """Stops when the eval metric has not improved for `patience` evaluations (0 disables)."""

  def __init__(self, patience: int, mode: str = 'min', saved: dict | None = None):
    self.patience = patience
    self.sign = 1.0 if mode == 'min' else -1.0  # compare sign * value: lower is better
    saved = saved or {}
    best = saved.get('best')
    self.best = self.sign * math.inf if best is None else best
    self.best_step = saved.get('best_step')
    self.bad_evals = saved.get('bad_evals', 0)

  def update(self, step, value):
    if value is None:
      return
    if self.sign * value < self.sign * self.best:
      self.best, self.best_step, self.bad_evals = float(value), int(step), 0
    else:
      self.bad_evals += 1

  @property
  def should_stop(self):
    return self.patience > 0 and self.bad_evals >= self.patience

  def state(self):
    return {'best': self.best if math.isfinite(self.best) else None, 'best_step': self.best_step,
            'bad_evals': self.bad_evals}


class _Profiler:
  """A jax.profiler trace of steps [start, start + num) (0-based step numbers)."""

  def __init__(self, start: int, num: int, directory: str):
    self.start, self.end, self.directory = start, start + num, directory
    self.active = False

  def before(self, step):
    if self.start and step == self.start and not self.active:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step, metrics):
    if self.active and step >= self.end:
      jax.block_until_ready(metrics)
      jax.profiler.stop_trace()
      self.active = False
      logging.info('profiler trace of steps %d-%d written to %s', self.start, self.end - 1,
                   self.directory)


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def _progress_bar(enabled, start, total):
  if not enabled:
    return None
  import tqdm
  return tqdm.tqdm(initial=start, total=total, unit='step', dynamic_ncols=True)
