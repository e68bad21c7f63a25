"""The config schema: every field, its default and what it means, plus start-up validation.

Workload files in `configs/` start from `base_config()` and change what they need. `validate()` runs
before anything is compiled and rejects unknown fields and bad values with a `ConfigError` that names
the field (`config.model.hidden_size: ...`). The rules for what may change on resume live here too
(`validate_resume`), beside the fields they are about.
"""
import fnmatch
import json

import ml_collections
from absl import logging
from ml_collections import config_dict

from mlm_jax.data import config as data_config
from mlm_jax.errors import ConfigError


def base_config() -> ml_collections.ConfigDict:
  """All fields with their defaults. A workload config may change values but not add fields."""
  c = ml_collections.ConfigDict()
  # Seed of everything random: init, data order, masks, dropout. Same seed => same run.
  c.seed = 0

  c.model = m = ml_collections.ConfigDict()
  # Number of encoder blocks.
  m.num_layers = 2
  # Width of the residual stream (embedding size).
  m.hidden_size = 128
  # Attention heads; must divide hidden_size.
  m.num_heads = 2
  # Width of the feed-forward block (BERT uses 4 * hidden_size).
  m.intermediate_size = 512
  # Token vocabulary size; must equal the tokenizer's vocabulary size.
  m.vocab_size = 2048
  # Longest sequence (tokens incl. [CLS]/[SEP]); size of the position table.
  m.max_len = 128
  # Token-type vocabulary (2 for BERT segment A/B, or structural/text for event sessions).
  m.type_vocab_size = 2
  # Extra categorical inputs added to the token embedding: name -> vocabulary size,
  # e.g. {'tld': 600} or {'event_type': 16}. The data pipeline emits a [B, L] id array per name.
  m.extra_embeddings = ml_collections.ConfigDict()
  # Dropout on embeddings, attention output and feed-forward output (0 disables). modernbert, as
  # transformers': on the embeddings and the GeGLU activation (embedding_dropout, mlp_dropout).
  m.dropout = 0.1
  # Dropout on attention probabilities (0 disables; keeps the fused attention kernels usable).
  # modernbert, as transformers': on the attention output too.
  m.attention_dropout = 0.0
  # 'post' = original BERT (LayerNorm after each residual add); 'pre' = pre-LN (more stable, deep models).
  m.layer_norm = 'post'
  # LayerNorm epsilon.
  m.layer_norm_eps = 1e-12
  # Std of the truncated-normal initializer (BERT: 0.02).
  m.init_std = 0.02
  # Compute dtype: 'float32', or 'bfloat16' for mixed precision (params stay in param_dtype).
  # 'auto' = bfloat16 on GPU/TPU, float32 on CPU.
  m.dtype = 'auto'
  # Parameter and optimizer-state dtype.
  m.param_dtype = 'float32'
  # Rematerialization of each encoder block in the backward pass: 'none' (fastest, most memory),
  # 'full' (recompute everything, least memory), 'save_dots' (keep matmul outputs, recompute the rest).
  # Use with scan_layers=True: XLA:CPU schedules an unrolled loop's recomputation early and saves ~5%
  # instead of 65-75% (docs/performance.md).
  m.remat_policy = 'none'
  # Apply the (always stacked) encoder blocks with lax.scan: fast compile for deep models, same numbers.
  m.scan_layers = False
  # Attention implementation: 'auto' (cuDNN's fused kernel on GPU for bfloat16 compute where cuDNN
  # accepts the shapes; on CPU in bfloat16 ops' own, whose matmuls stay bf16; else XLA's
  # jax.nn.dot_product_attention), 'xla' or 'cudnn' (fails if unsupported; no attention dropout).
  m.attention_impl = 'auto'
  # Architecture: 'bert' (learned positions, post- or pre-LN) or 'modernbert' (transformers'
  # ModernBERT: rotary, bias-free pre-LN, GeGLU, alternating global/local attention; needs
  # layer_norm='pre'; type_vocab_size unused; no extra_embeddings).
  m.arch = 'bert'
  # modernbert: window of the local layers; a token attends to those at most local_attention // 2
  # positions away (128: ±64). Even, > 0.
  m.local_attention = 128
  # modernbert: layer i attends globally when i % global_attn_every_n_layers == 0, else locally.
  m.global_attn_every_n_layers = 3
  # modernbert: rotary base (theta) of the global layers.
  m.global_rope_theta = 160000.0
  # modernbert: rotary base (theta) of the local layers.
  m.local_rope_theta = 10000.0

  c.optimizer = o = ml_collections.ConfigDict()
  # Peak learning rate (reached at the end of warmup).
  o.learning_rate = 1e-3
  # Decay after warmup: 'cosine', 'linear', 'constant' or 'wsd' (warmup-stable-decay: the peak until
  # the last wsd_decay_fraction of train.steps, then a 1-sqrt decay to the end; docs/recipes.md).
  o.schedule = 'cosine'
  # Linear warmup from 0 over this many optimizer steps.
  o.warmup_steps = 100
  # Final learning rate as a fraction of the peak (cosine/linear/wsd).
  o.end_lr_ratio = 0.0
  # schedule='wsd': share of train.steps spent in the final 1-sqrt decay (in [0, 1]).
  o.wsd_decay_fraction = 0.2
  # Decoupled (AdamW) weight decay; never applied to biases or LayerNorm scales.
  o.weight_decay = 0.01
  # Adam first-moment decay.
  o.b1 = 0.9
  # Adam second-moment decay.
  o.b2 = 0.999
  # Adam epsilon.
  o.eps = 1e-6
  # Clip gradients to this global norm (0 disables).
  o.clip_norm = 1.0
  # StableAdamW-style update clipping: each tensor's learning rate divided by
  # max(1, sqrt(mean(g^2 / max(v_hat, eps^2)))) (docs/recipes.md); usually with clip_norm=0.
  o.update_clipping = False

  c.train = t = ml_collections.ConfigDict()
  # Optimizer steps to train for (one step = batch_size sequences, whatever grad_accum_steps is;
  # fewer during a batch_ramp_steps ramp).
  t.steps = 1000
  # Global batch size in sequences, across all devices and hosts. 'auto': 128 on GPU/TPU, 16 on CPU,
  # picked once JAX has started (after jax.distributed); config.json and checkpoints record the number.
  t.batch_size = config_dict.FieldReference(32, field_type=object)
  # Micro-batches per optimizer step (summed inside one jitted step); must divide batch_size.
  # 'auto' (or 0): the fewest whose compiled step fits device memory (same mathematics, less
  # memory); the count picked is what config.json and the checkpoints record.
  t.grad_accum_steps = config_dict.FieldReference(1, field_type=object)
  # Device memory budget per device for grad_accum_steps='auto', in bytes (0 = the device's own
  # limit; CPU has none, so 'auto' picks 1 there unless this is set).
  t.device_memory_limit = 0
  # Batch-size ramp: over the first this many steps the micro-batches per step grow from
  # batch_ramp_start to grad_accum_steps (micro-batch shape unchanged; docs/recipes.md). 0 = off.
  t.batch_ramp_steps = 0
  # Micro-batches per step at step 0 of the ramp (1 .. grad_accum_steps).
  t.batch_ramp_start = 1
  # Log train metrics every this many steps.
  t.log_every = 50
  # Evaluate every this many steps (0 disables; an eval always runs at the last step if enabled).
  t.eval_every = 500
  # Eval batches per evaluation (-1 = the whole eval split).
  t.eval_steps = 20
  # Debug hook: train on the first batch over and over; the loss must go to ~0.
  t.overfit_one_batch = False
  # Loss or gradient not finite: 'halt' (stop with a message; the bad update is never applied)
  # or 'skip' (drop that update and go on; halt after max_nonfinite_in_a_row).
  t.nonfinite = 'halt'
  # With nonfinite='skip': halt after this many non-finite steps in a row.
  t.max_nonfinite_in_a_row = 10
  # Warn when the global gradient norm (before clipping) exceeds this.
  t.grad_norm_warn = 100.0
  # Peak FLOP/s of one device for the MFU estimate; 0 = look up by device kind (measured on CPU).
  t.peak_flops = 0.0
  # Stop when checkpoint.best_metric has not improved for this many evaluations (0 disables).
  t.early_stopping_patience = 0
  # A new run's parameters start from this: a run directory (its newest checkpoint), a checkpoint
  # step directory, or a Hugging Face BERT or ModernBERT directory ('' = random init). Optimizer
  # state and step start fresh; a larger model.max_len interpolates the trained position table
  # (README "Continued pretraining"). Only when the workdir has no checkpoint: a resumed run
  # restores its own and ignores this field (so changing it on resume is allowed).
  t.init_from = ''
  # Resume even if a field that breaks bitwise-exact continuation changed (model shape, seed, data,
  # batch size, ...); the run warns that the resume is not exact.
  t.allow_inexact_resume = False
  # Write a jax.profiler trace of profile_num_steps steps from this step on into DIR/profile
  # (view with TensorBoard's profile plugin or Perfetto); 0 = off.
  t.profile_start_step = 0
  # Steps in the profiler trace.
  t.profile_num_steps = 5
  # Persistent XLA compilation cache, so a restarted run does not compile again ('' = off).
  t.compilation_cache_dir = '~/.cache/mlm_jax/xla'
  # Weights & Biases project to log metrics to as well ('' = off; needs `pip install wandb`).
  t.wandb_project = ''
  # Show a console progress bar when stderr is a terminal; otherwise (SLURM, cloud logging) a plain
  # line every log_every steps: step, loss, tokens/s, ETA.
  t.progress_bar = True

  c.sharding = s = ml_collections.ConfigDict()
  # Devices on the 'data' mesh axis (-1 = all devices not used by fsdp).
  s.data = -1
  # Devices on the 'fsdp' mesh axis: params and optimizer state are sharded over it (1 = replicated).
  s.fsdp = 1
  # Add gradients and metric sums across devices in a fixed order (all-to-all + local sum +
  # all-gather, the traffic of a ring all-reduce) instead of the collective library's own order:
  # the run is then bitwise the same however its devices are split into processes (1 x 4 == 2 x 2),
  # not just equal to ~1e-7. Costs one full gradient per device (fsdp params are gathered for the
  # step) and dropout is drawn per device, so results depend on the total device count.
  s.fixed_order_reduction = False

  c.data = data_config.defaults()

  c.checkpoint = k = ml_collections.ConfigDict()
  # Save every this many steps (0 = only at the end and on preemption).
  k.every = 500
  # Also save when this many seconds have passed since the last save (0 = off): a bound on the work
  # a preemption can lose. Checked at log steps (train.log_every), decided by process 0 for all.
  k.every_seconds = 0.0
  # Keep the newest this many checkpoints.
  k.keep = 2
  # Also keep the best this many by best_metric (0 disables).
  k.keep_best = 1
  # Eval metric that ranks checkpoints and drives early stopping.
  k.best_metric = 'eval/loss'
  # 'min' if a lower best_metric is better (loss, perplexity), 'max' if higher is (accuracy).
  k.best_mode = 'min'
  # Save in a background thread (training goes on while the bytes are written).
  k.async_save = True
  return c


_CHOICES = {
    'model.layer_norm': ('post', 'pre'),
    'model.dtype': ('auto', 'float32', 'bfloat16'),
    'model.param_dtype': ('float32', 'bfloat16'),
    'model.remat_policy': ('none', 'full', 'save_dots'),
    'model.attention_impl': ('auto', 'xla', 'cudnn'),
    'model.arch': ('bert', 'modernbert'),
    'optimizer.schedule': ('cosine', 'linear', 'constant', 'wsd'),
    'train.nonfinite': ('halt', 'skip'),
    'checkpoint.best_mode': ('min', 'max'),
}
_POSITIVE = ('model.num_layers', 'model.hidden_size', 'model.num_heads', 'model.intermediate_size',
             'model.vocab_size', 'model.max_len', 'model.type_vocab_size', 'train.steps',
             'train.log_every')
_NON_NEGATIVE = ('train.device_memory_limit', 'train.batch_ramp_steps', 'train.profile_start_step', 'train.profile_num_steps', 'optimizer.warmup_steps', 'optimizer.weight_decay', 'optimizer.clip_norm',
                 'optimizer.end_lr_ratio', 'train.eval_every', 'train.peak_flops',
                 'checkpoint.every', 'checkpoint.every_seconds', 'checkpoint.keep_best', 'train.max_nonfinite_in_a_row')


def _flatten(d, prefix=''):
  out = {}
  for key, value in d.items():
    name = f'{prefix}{key}'
    if isinstance(value, (ml_collections.ConfigDict, dict)) and not name.startswith(
        'model.extra_embeddings'):
      out.update(_flatten(value, name + '.'))
    else:
      out[name] = value
  return out


def get(config, name):
  for part in name.split('.'):
    config = config[part]
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first unknown field or bad value."""
  base = _flatten(base_config())
  given = _flatten(config)
  for name, value in given.items():
    if name not in base:
      raise ConfigError(name, 'unknown field (see README "Config reference")')
    if name == 'train.grad_accum_steps':
      _check_grad_accum(value)
      continue
    if name == 'train.batch_size':
      _check_batch_size(value)
      continue
    default = base[name]
    if isinstance(default, bool) and not isinstance(value, bool):
      raise ConfigError(name, f'expected true/false, got {value!r}')
    if isinstance(default, (int, float)) and not isinstance(default, bool) and (
        isinstance(value, bool) or not isinstance(value, (int, float))):
      raise ConfigError(name, f'expected a number, got {value!r}')
    if isinstance(default, str) and not isinstance(value, str):
      raise ConfigError(name, f'expected a string, got {value!r}')
  for name, choices in _CHOICES.items():
    if get(config, name) not in choices:
      raise ConfigError(name, f'{get(config, name)!r} is not one of {choices}')
  for name in _POSITIVE:
    if get(config, name) <= 0:
      raise ConfigError(name, f'must be > 0, got {get(config, name)}')
  for name in _NON_NEGATIVE:
    if get(config, name) < 0:
      raise ConfigError(name, f'must be >= 0, got {get(config, name)}')
  m, t, o = config.model, config.train, config.optimizer
  if m.hidden_size % m.num_heads:
    raise ConfigError('model.num_heads', f'{m.num_heads} does not divide hidden_size {m.hidden_size}')
  for name, size in m.extra_embeddings.items():
    if not isinstance(size, int) or size <= 0:
      raise ConfigError(f'model.extra_embeddings.{name}', f'vocabulary size must be an int > 0, got {size!r}')
  if not 0 <= m.dropout < 1:
    raise ConfigError('model.dropout', f'must be in [0, 1), got {m.dropout}')
  if not 0 <= m.attention_dropout < 1:
    raise ConfigError('model.attention_dropout', f'must be in [0, 1), got {m.attention_dropout}')
  if m.arch == 'modernbert':
    _check_modernbert(m)
  if not is_auto_accum(t.grad_accum_steps) and t.batch_size != AUTO and (
      t.batch_size % t.grad_accum_steps):
    raise ConfigError('train.grad_accum_steps',
                      f'{t.grad_accum_steps} does not divide train.batch_size {t.batch_size}')
  _check_batch_ramp(t)
  if o.learning_rate <= 0:
    raise ConfigError('optimizer.learning_rate', f'must be > 0, got {o.learning_rate}')
  _check_wsd(o, t)
  if not (0 <= o.b1 < 1 and 0 <= o.b2 < 1):
    raise ConfigError('optimizer.b1' if not 0 <= o.b1 < 1 else 'optimizer.b2', 'must be in [0, 1)')
  if o.warmup_steps > t.steps:
    logging.warning('optimizer.warmup_steps=%d is longer than train.steps=%d: the learning rate '
                    'never reaches its peak %g (it ends at %.3g)', o.warmup_steps, t.steps,
                    o.learning_rate, o.learning_rate * t.steps / o.warmup_steps)
  if config.sharding.fsdp < 1 or (config.sharding.data < 1 and config.sharding.data != -1):
    raise ConfigError('sharding', 'data must be -1 or >= 1 and fsdp >= 1')
  if config.checkpoint.keep < 1:
    raise ConfigError('checkpoint.keep', 'must be >= 1 (the newest checkpoint is always kept)')
  if t.batch_size == AUTO:  # the data checks need a number: any 'auto' pick passes them alike
    values = config.to_dict()
    values['train']['batch_size'] = min(AUTO_BATCH_SIZE.values())
    config = ml_collections.ConfigDict(values)
  data_config.validate(config)


def _check_modernbert(m):
  if m.layer_norm != 'pre':
    raise ConfigError('model.layer_norm', f"{m.layer_norm!r}: modernbert is pre-LN; set 'pre'")
  if m.extra_embeddings:
    raise ConfigError('model.extra_embeddings', 'modernbert has no extra embeddings')
  if m.local_attention <= 0 or m.local_attention % 2:
    raise ConfigError('model.local_attention', f'must be even and > 0, got {m.local_attention}')
  if m.global_attn_every_n_layers < 1:
    raise ConfigError('model.global_attn_every_n_layers',
                      f'must be >= 1, got {m.global_attn_every_n_layers}')
  for name in ('global_rope_theta', 'local_rope_theta'):
    if m[name] <= 0:
      raise ConfigError(f'model.{name}', f'must be > 0, got {m[name]}')


AUTO = 'auto'
# train.batch_size='auto' by backend ('cpu', else the accelerator value).
AUTO_BATCH_SIZE = {'cpu': 16, 'accelerator': 128}


def resolve_batch_size(value, backend: str) -> int:
  """train.batch_size, with 'auto' picked for `backend` (jax.default_backend())."""
  if value != AUTO:
    return value
  return AUTO_BATCH_SIZE['cpu' if backend == 'cpu' else 'accelerator']


def _check_batch_size(value):
  if value == AUTO:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ConfigError('train.batch_size', f"expected a count >= 1, or 'auto', got {value!r}")


def is_auto_accum(value) -> bool:
  """train.grad_accum_steps asks for the automatic choice ('auto' or 0)."""
  return value == 0 or value == 'auto'


def _check_grad_accum(value):
  if is_auto_accum(value):
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ConfigError('train.grad_accum_steps',
                      f"expected a count >= 1, or 'auto' (or 0) to pick one, got {value!r}")


def _check_batch_ramp(t):
  if t.batch_ramp_start < 1:
    raise ConfigError('train.batch_ramp_start', f'must be >= 1, got {t.batch_ramp_start}')
  if t.batch_ramp_steps and is_auto_accum(t.grad_accum_steps):
    raise ConfigError('train.batch_ramp_steps', "a ramp needs a fixed train.grad_accum_steps to "
                      "grow to, not 'auto': set train.grad_accum_steps to a count")
  if not is_auto_accum(t.grad_accum_steps) and t.batch_ramp_start > t.grad_accum_steps:
    raise ConfigError('train.batch_ramp_start', f'{t.batch_ramp_start} is more than '
                      f'train.grad_accum_steps={t.grad_accum_steps} (the micro-batches of a full '
                      'step)')
  if t.batch_ramp_steps and t.overfit_one_batch:
    raise ConfigError('train.batch_ramp_steps', 'train.overfit_one_batch repeats one batch of one '
                      'size: set batch_ramp_steps=0')


def _check_wsd(o, t):
  if not 0 <= o.wsd_decay_fraction <= 1:
    raise ConfigError('optimizer.wsd_decay_fraction', f'must be in [0, 1], got '
                      f'{o.wsd_decay_fraction}')
  decay = int(round(o.wsd_decay_fraction * t.steps))
  if o.schedule == 'wsd' and o.warmup_steps + decay > t.steps:
    logging.warning('optimizer.wsd_decay_fraction: the decay (%d steps) and optimizer.warmup_steps=%d '
                    'overlap in train.steps=%d: the decay starts when warmup ends (%d steps)',
                    decay, o.warmup_steps, t.steps, max(0, t.steps - o.warmup_steps))


def resolve_dtype(name: str, backend: str) -> str:
  """'auto' compute dtype: bfloat16 where the hardware has fast bf16 matmuls, else float32."""
  if name != 'auto':
    return name
  return 'float32' if backend == 'cpu' else 'bfloat16'


def max_predictions(config) -> int:
  """P, the fixed number of prediction slots per sequence."""
  return data_config.max_predictions(config)


# ---------------------------------------------------------------------------------------------
# What may change on resume.

# Config fields (fnmatch patterns over dotted paths) whose change breaks bitwise-exact resume:
# parameter shapes/dtypes, every source of randomness or data order, and the update rule.
EXACTNESS_BREAKING = ('model.*', 'seed', 'data.*', 'optimizer.*', 'train.batch_size',
                      'train.grad_accum_steps', 'train.steps', 'train.overfit_one_batch',
                      'train.batch_ramp_steps', 'train.batch_ramp_start',
                      'sharding.fixed_order_reduction')
# train.init_from is free (matched by no pattern): it only chooses a fresh run's starting params,
# and a resumed run restores its own.
# More specific patterns that stay free although a pattern above matches them. Eval fields of
# `data` are not here: empty eval files/split mean "carve eval out of train", which changes train.
# The pipeline's output does not depend on its worker count or buffer sizes (tests/test_resume.py).
EXACTNESS_SAFE = ('data.cache_dir', 'data.num_workers', 'data.worker_buffer_size',
                  'data.prefetch_chunks', 'data.license')


def json_ready(obj):
  """What JSON would give back (tuples become lists), so saved and live configs compare equal."""
  return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, 'item') else str(o)))


def breaks_exactness(field: str) -> bool:
  match = lambda patterns: any(fnmatch.fnmatchcase(field, p) for p in patterns)
  return match(EXACTNESS_BREAKING) and not match(EXACTNESS_SAFE)


def validate_resume(saved_config: dict, config: dict, allow_inexact: bool = False) -> None:
  """Refuses (ConfigError naming the field) a resume whose config change breaks exactness."""
  to_dict = lambda c: c.to_dict() if hasattr(c, 'to_dict') else c
  old, new = _flatten(json_ready(to_dict(saved_config))), _flatten(json_ready(to_dict(config)))
  # A field the checkpoint lacks was added to the schema after it was written: it counts as its
  # default, since a new field's default is the behaviour from before it existed.
  defaults = _flatten(json_ready(base_config().to_dict()))
  old = {**{k: defaults[k] for k in new.keys() - old.keys() if k in defaults}, **old}
  missing = object()
  changed = sorted(k for k in old.keys() | new.keys()
                   if old.get(k, missing) != new.get(k, missing) and breaks_exactness(k))
  both = lambda field, value: old.get(field) == new.get(field) == value
  unused = set()  # fields the update rule does not read in this run
  if both('optimizer.schedule', 'constant'):
    unused.add('train.steps')  # the schedule does not depend on it
  if 'wsd' not in (old.get('optimizer.schedule'), new.get('optimizer.schedule')):
    unused.add('optimizer.wsd_decay_fraction')
  if both('train.batch_ramp_steps', 0):
    unused.add('train.batch_ramp_start')
  changed = [k for k in changed if k not in unused]
  if not changed:
    return
  first = changed[0]
  was, now = old.get(first, '<absent>'), new.get(first, '<absent>')
  detail = (f'was {was!r} in the checkpoint, now {now!r}'
            + (f' (also changed: {", ".join(changed[1:])})' if len(changed) > 1 else ''))
  if not allow_inexact:
    raise ConfigError(first, f'{detail}; this breaks exact resume. Restore the old value, use a '
                      'new workdir, or set train.allow_inexact_resume=True.')
  logging.warning('Inexact resume: config.%s %s.', first, detail)
