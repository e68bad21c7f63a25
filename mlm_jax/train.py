"""The training loop: build everything from the config, resume if a checkpoint exists, train, evaluate.

`train_and_evaluate(config, workdir)` is the whole program; `main.py` only parses flags.
"""
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from mlm_jax import autotune
from mlm_jax import checkpoint as ckpt
from mlm_jax import config as config_lib
from mlm_jax import data
from mlm_jax import metrics as metrics_lib
from mlm_jax import model as model_lib
from mlm_jax import optim
from mlm_jax import sharding as shd
from mlm_jax import steps


class TrainingHalted(RuntimeError):
  """Raised when training cannot go on (non-finite loss); the message says why and where."""


def build_model(config, backend: str | None = None):
  """(graphdef, abstract params, BertConfig) without allocating the parameters."""
  dtype = config_lib.resolve_dtype(config.model.dtype, backend or jax.default_backend())
  cfg = model_lib.BertConfig.from_config(config.model, dtype)
  abstract = nnx.eval_shape(lambda: model_lib.Bert(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract)
  return graphdef, abstract_params, cfg


class Trainer:
  """Holds the compiled steps, the sharded state and the input; `train_and_evaluate` drives it."""

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
      model = model_lib.Bert(self.model_cfg, rngs=nnx.Rngs(params=key))
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

  def init_state(self):
    return self._init(jax.random.key(self.config.seed))

  def compile_steps(self, batch_keys):
    self.batch_keys = tuple(sorted(batch_keys))
    self._train_step = steps.jit_train_step(
        self.graphdef, self.optimizer, self.schedule, self.config, self.mesh, self.state_shardings,
        self.batch_keys)
    self._eval_step = steps.jit_eval_step(self.graphdef, self.mesh, self.state_shardings['params'],
                                          self.batch_keys, self.config.sharding.fixed_order_reduction)

  def train_step(self, state, local_batch):
    return self._train_step(state, shd.global_batch(local_batch, self.mesh))

  def evaluate(self, params, batches) -> dict:
    sums = {'loss_sum': 0.0, 'correct_sum': 0.0, 'weight_sum': 0.0}
    pending = []
    for local_batch in batches:
      pending.append(self._eval_step(params, shd.global_batch(local_batch, self.mesh)))
    for m in jax.device_get(pending):
      for k in sums:
        sums[k] += float(m[k])
    return metrics_lib.eval_summary(sums)


class _QuietLibraries:
  """absl log filter: INFO lines from orbax/grain/tensorstore internals are noise for a user."""
  _NOISY = ('/orbax/', '/grain/', '/tensorstore/', '/etils/')

  def filter(self, record):
    return record.levelno >= 30 or not any(p in record.pathname for p in self._NOISY)


def quiet_library_logs():
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())


def _write_json(path, obj):
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_after: int | None = None) -> dict:
  """Trains (resuming from the newest checkpoint in workdir if any); returns the last metrics.

  `stop_after=N` stops at step N as a preemption would (checkpoint, then return): a notebook can
  train in slices, and tests interrupt runs at a chosen step.
  """
  config_lib.validate(config)
  quiet_library_logs()
  if '://' not in workdir:
    workdir = os.path.abspath(workdir)
  if config.train.compilation_cache_dir:  # a restarted run loads its programs instead of compiling
    jax.config.update('jax_compilation_cache_dir',
                      os.path.expanduser(config.train.compilation_cache_dir))
  config = ml_collections.ConfigDict(config.to_dict())  # a private, unlocked copy
  is_main = jax.process_index() == 0
  tokenizer = data.build_tokenizer(config)  # checks model.vocab_size against the vocabulary
  trainer = Trainer(config, workdir)  # checks the mesh against the devices
  os.makedirs(workdir, exist_ok=True)  # only now: a rejected config writes nothing
  t = config.train
  resolved = config.to_dict()
  resolved['model']['dtype'] = trainer.model_cfg.dtype
  if is_main:
    _write_json(os.path.join(workdir, 'config.json'), resolved)
    tokenizer.save(os.path.join(workdir, 'tokenizer'))
  logging.info('model: %s parameters (%s in the encoder blocks), compute dtype %s, mesh %s',
               f"{trainer.param_counts['total']:,}", f"{trainer.param_counts['encoder']:,}",
               trainer.model_cfg.dtype, dict(trainer.mesh.shape))

  train_iter = data.train_iterator(config, tokenizer, process_index=jax.process_index(),
                                   process_count=jax.process_count())
  checkpointer = ckpt.Checkpointer(
      os.path.join(workdir, 'checkpoints'), keep=config.checkpoint.keep,
      keep_best=config.checkpoint.keep_best, best_metric=config.checkpoint.best_metric,
      best_mode=config.checkpoint.best_mode,
      async_save=config.checkpoint.async_save)
  latest = checkpointer.latest_step()
  if latest is not None:  # refuse a changed config before touching any array
    try:
      saved_config = checkpointer.metadata(latest)['config']
    except Exception:  # noqa: BLE001 -- unreadable: restore() below falls back and says why
      saved_config = None
    if saved_config is not None:
      ckpt.validate_resume(saved_config, resolved, allow_inexact=t.allow_inexact_resume)
  restored = checkpointer.restore(trainer.abstract_state)
  if restored is None:
    state = trainer.init_state()
    start_step = 0
  else:
    state, meta = restored
    start_step = int(jax.device_get(state['step']))
    if meta.get('data_state'):
      train_iter.set_state(meta['data_state'])
    else:
      logging.warning('checkpoint step %d has no input position: the input starts from the '
                      'beginning (e.g. a checkpoint made by tools/import_hf.py)', start_step)
    logging.info('resumed from step %d', start_step)
  early = EarlyStopping(t.early_stopping_patience, config.checkpoint.best_mode,
                        meta.get('early_stopping') if restored else None)

  writer = metrics_lib.Writer(workdir, enabled=is_main, resume_step=start_step,
                              wandb_project=t.wandb_project, config=resolved)
  preemption = ckpt.install_preemption_handler()
  peak = metrics_lib.peak_flops_per_device(t.peak_flops) * jax.device_count()
  mask_fraction = min(1.0, config.data.mask_rate)
  flops_per_token = model_lib.model_flops_per_token(trainer.model_cfg, trainer.param_counts['encoder'],
                                                    mask_fraction)

  def metadata(step):
    return {'config': resolved, 'step': step, 'early_stopping': early.state(),
            'param_counts': trainer.param_counts, 'data_state': _gathered_input_state(train_iter)}

  def save(step, eval_metrics=None, force=False):
    if checkpointer.save(step, state, metadata=metadata(step),
                         metrics=eval_metrics, force=force):
      writer.write(step, {'checkpoint/blocking_s': checkpointer.last_blocking_s})

  first_batch = next(train_iter) if t.overfit_one_batch else None
  next_batch = lambda: first_batch if t.overfit_one_batch else next(train_iter)
  acc = metrics_lib.Accumulator()
  last = {}
  nonfinite_in_a_row = 0
  bar = _progress_bar(is_main and t.progress_bar, start_step, t.steps)
  pending = None  # (step, metrics on device): fetched one step late so the device never waits
  step = start_step
  data_wait = 0.0
  profiler = _Profiler(t.profile_start_step, t.profile_num_steps, os.path.join(workdir, 'profile'))
  try:
    while step < t.steps:
      tic = time.perf_counter()
      batch = next_batch()
      data_wait += time.perf_counter() - tic
      if trainer.batch_keys is None:
        if t.grad_accum_steps == 0:
          t.grad_accum_steps = autotune.pick_grad_accum(
              autotune.train_step_compiler(trainer, batch), t.batch_size, jax.device_count(),
              config=config)
          logging.info('train.grad_accum_steps=0 (auto): %d micro-batches per step',
                       t.grad_accum_steps)
        trainer.compile_steps(batch.keys())
      profiler.before(step)
      try:
        state, step_metrics = trainer.train_step(state, batch)
      except Exception as e:  # noqa: BLE001 -- only out-of-memory is turned into advice
        if autotune.is_resource_exhausted(e):
          raise TrainingHalted(autotune.oom_message(config, str(e).splitlines()[0])) from e
        raise
      step += 1
      if pending is not None:
        nonfinite_in_a_row = _consume(pending, acc, nonfinite_in_a_row, config)
      pending = (step, step_metrics)
      if step == start_step + 1:  # the first step compiled: report it, keep it out of the speed
        nonfinite_in_a_row = _consume(pending, acc, nonfinite_in_a_row, config)
        pending = None
        logging.info('compiled and ran the first step in %.1fs', time.perf_counter() - tic)
        acc.restart_clock()
        data_wait = 0.0
      is_last = step == t.steps
      do_log = step % t.log_every == 0 or is_last
      do_eval = t.eval_every > 0 and (step % t.eval_every == 0 or is_last)
      do_save = (config.checkpoint.every > 0 and step % config.checkpoint.every == 0) or is_last
      stop = preemption.should_stop(step) or step == stop_after
      if (do_log or do_eval or do_save or stop) and pending is not None:
        nonfinite_in_a_row = _consume(pending, acc, nonfinite_in_a_row, config)
        pending = None
      if do_log:
        elapsed = max(acc.train_seconds(), 1e-9)
        tokens_per_sec = acc.timed_tokens / elapsed
        last = {**acc.summary(), 'train/learning_rate': float(step_metrics['learning_rate']),
                'train/tokens_per_sec': tokens_per_sec,
                'train/step_time': elapsed / max(acc.timed_steps, 1),
                'train/mfu': tokens_per_sec * flops_per_token / peak,
                'train/data_wait_fraction': data_wait / elapsed}
        if acc.grad_norms and max(acc.grad_norms) > t.grad_norm_warn:
          logging.warning('step %d: gradient norm %.3g is above train.grad_norm_warn=%g',
                          step, max(acc.grad_norms), t.grad_norm_warn)
        writer.write(step, last)
        acc.reset()
        data_wait = 0.0
        if bar:
          bar.set_postfix(loss=f"{last['train/loss']:.3f}", lr=f"{last['train/learning_rate']:.2e}")
      eval_metrics = None
      tic = time.perf_counter()
      if do_eval:
        eval_metrics = trainer.evaluate(state['params'], data.eval_batches(
            config, tokenizer, process_index=jax.process_index(),
            process_count=jax.process_count(), max_batches=None if t.eval_steps < 0 else t.eval_steps))
        writer.write(step, eval_metrics)
        last.update(eval_metrics)
        early.update(step, eval_metrics.get(config.checkpoint.best_metric))
        if early.should_stop:
          logging.info('early stopping at step %d: %s did not improve for %d evaluations '
                       '(best %.4g at step %d)', step, config.checkpoint.best_metric,
                       t.early_stopping_patience, early.best, early.best_step)
      if do_save or stop or early.should_stop:
        save(step, eval_metrics, force=is_last or stop or early.should_stop)
      profiler.after(step, step_metrics)
      acc.exclude(time.perf_counter() - tic)
      if bar:
        bar.update(1)
      if stop:
        checkpointer.wait()
        logging.info('preempted: saved step %d in %s; run the same command to continue',
                     step, checkpointer.directory)
        break
      if early.should_stop:
        break
    checkpointer.wait()
  finally:
    if bar:
      bar.close()
    writer.close()
    checkpointer.close()
    train_iter.close()
    preemption.uninstall()
  if early.best_step is not None:
    logging.info('best %s = %.4g at step %d', config.checkpoint.best_metric, early.best,
                 early.best_step)
    last['best_step'] = early.best_step
  last['step'] = step
  return last


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


def _consume(pending, acc, nonfinite_in_a_row, config):
  """Fetch one step's metrics and apply the non-finite policy."""
  step, m = pending
  m = jax.device_get(m)
  acc.add(m)
  if not m['nonfinite']:
    return 0
  nonfinite_in_a_row += 1
  t = config.train
  loss = float(m['loss_sum']) / max(float(m['weight_sum']), 1.0)
  msg = (f'step {step}: non-finite loss ({loss}) or gradient norm ({float(m["grad_norm"])}); '
         f'the update was not applied')
  if t.nonfinite == 'halt':
    raise TrainingHalted(msg + '. Halting (train.nonfinite=halt). Lower optimizer.learning_rate, '
                         'set optimizer.clip_norm, or use train.nonfinite=skip.')
  if nonfinite_in_a_row >= t.max_nonfinite_in_a_row:
    raise TrainingHalted(msg + f'; {nonfinite_in_a_row} in a row '
                         f'(train.max_nonfinite_in_a_row={t.max_nonfinite_in_a_row}). Halting.')
  logging.warning(msg + ' (skipped, train.nonfinite=skip)')
  return nonfinite_in_a_row


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


def _progress_bar(enabled, start, total):
  if not enabled:
    return None
  import tqdm
  return tqdm.tqdm(initial=start, total=total, unit='step', dynamic_ncols=True)
