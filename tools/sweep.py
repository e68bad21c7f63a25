"""Hyperparameter search with Optuna over short runs: eval loss alone (pruned), or a multi-objective
study of loss, speed and memory with its Pareto set.

  python tools/sweep.py --config=configs/quickstart.py --trials=20 --steps=200 --workdir=runs/sweep
      [--evals=4] [--lr_range=1e-4,1e-2] [--no_prune] [--config.train.batch_size=16 ...]
  python tools/sweep.py --config=configs/quickstart.py --trials=30 --steps=200 --workdir=runs/pareto
      --objectives=loss,tokens_per_sec,peak_memory --search=optimizer,shape [--population=10]

--search picks what each trial draws; everything else comes from --config:
  optimizer: learning rate (log scale), warmup ratio, weight decay, clip norm, Adam b1/b2, schedule.
  shape: train.batch_size (half, same or double the config's, where it splits over the devices),
    model.remat_policy (none, save_dots, full) and model.dtype (float32, bfloat16): the knobs that
    trade speed for memory. Remat saves memory mostly with --config.model.scan_layers=True.
--objectives (comma-separated; a trial's values are also in WORKDIR/sweep_summary.json):
  loss: final eval/loss, minimized.
  tokens_per_sec: the trial's train/tokens_per_sec from its metrics.jsonl, median over the logged
    steps after the first (that one holds the warm-up), maximized.
  peak_memory: bytes per device of the compiled train step (inputs + outputs + temporaries, from
    XLA's memory analysis; costs one more compile per trial), minimized. Where the backend has no
    memory analysis, the process's peak RSS instead (an upper bound: it includes earlier trials of
    the process); the output says which.

One objective (`loss`, the default): trial K trains in WORKDIR/trial_K in slices that end at each
eval (train_and_evaluate(stop_after=...); resume is bitwise exact, so slicing does not change the
numbers); after each slice its eval/loss goes to Optuna's TPE sampler, which may prune the trial.
Several objectives: an NSGA-II study (its first --population trials are random), trials train in
one piece (Optuna does not prune multi-objective studies), and the end prints the Pareto set as a
table, plots every pair of objectives to WORKDIR/pareto.png (all trials, the Pareto set
highlighted; needs matplotlib) and writes WORKDIR/sweep_summary.json with all trials and the set.
The last line is `RESULT trials=N ... best_loss=...` (plus `pareto=K` with several objectives).
The study lives in WORKDIR/optuna.db, so running the command again adds trials to it (with the
same --objectives, --search and config batch size: another search needs a new --workdir).
Needs optuna (pip install 'mlm_jax[sweep]').
"""
import itertools
import json
import math
import os
import resource
import statistics
import sys

from absl import app, flags, logging
from ml_collections import config_flags

CLIP_NORMS = (0.0, 0.5, 1.0, 2.0)
B2S = (0.98, 0.99, 0.995, 0.999)
SCHEDULES = ('cosine', 'linear', 'constant')
REMAT_POLICIES = ('none', 'save_dots', 'full')
DTYPES = ('float32', 'bfloat16')
# Objective -> Optuna direction.
OBJECTIVES = {'loss': 'minimize', 'tokens_per_sec': 'maximize', 'peak_memory': 'minimize'}
SEARCHES = ('optimizer', 'shape')
PARAMS = ('learning_rate', 'warmup_ratio', 'weight_decay', 'clip_norm', 'b1', 'b2', 'schedule',
          'batch_size', 'remat_policy', 'dtype')
MEMORY_SOURCES = {'compiled': 'compiled train step, bytes per device',
                  'rss': 'peak RSS of the sweep process, bytes (no memory analysis on this backend)'}


class SweepError(ValueError):
  """A sweep flag or the study in --workdir cannot be used as asked."""


def parse_names(value: str, allowed, flag: str) -> tuple[str, ...]:
  """'a,b' -> ('a', 'b'), each checked against `allowed`, no repeats."""
  names = tuple(n.strip() for n in value.split(',') if n.strip())
  bad = [n for n in names if n not in allowed]
  if not names or bad or len(set(names)) != len(names):
    raise SweepError(f'--{flag}={value!r}: expected distinct names from {", ".join(allowed)}')
  return names


def batch_sizes(config) -> list[int]:
  """train.batch_size choices for the shape search: half, same and double the config's, kept where
  the (micro-)batch splits evenly over the devices."""
  import jax  # pylint: disable=import-outside-toplevel

  from mlm_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  t = config.train
  b = config_lib.resolve_batch_size(t.batch_size, jax.default_backend())
  accum = 1 if config_lib.is_auto_accum(t.grad_accum_steps) else t.grad_accum_steps
  step = math.lcm(jax.device_count() * accum, config.data.num_shards or 1)
  return sorted({c for c in (b // 2, b, 2 * b) if c >= step and c % step == 0} or {b})


def search_space(config, objectives=('loss',), search=('optimizer',)) -> dict:
  """What fixes a study's search: recorded in the study, checked when more trials join it."""
  space = {'objectives': list(objectives), 'search': list(search)}
  if 'shape' in search:
    space['batch_sizes'] = batch_sizes(config)
  return space


def suggest(trial, config, lr_range: tuple[float, float], search=('optimizer',)) -> dict:
  """Draws one trial's fields; returns them as dotted config overrides."""
  out = {}
  if 'optimizer' in search:
    steps = config.train.steps
    warmup_ratio = trial.suggest_float('warmup_ratio', 0.0, 0.2)
    out.update({
        'optimizer.learning_rate': trial.suggest_float('learning_rate', *lr_range, log=True),
        'optimizer.warmup_steps': int(round(warmup_ratio * steps)),
        'optimizer.weight_decay': trial.suggest_float('weight_decay', 0.0, 0.1),
        'optimizer.clip_norm': trial.suggest_categorical('clip_norm', CLIP_NORMS),
        'optimizer.b1': trial.suggest_float('b1', 0.85, 0.95),
        'optimizer.b2': trial.suggest_categorical('b2', B2S),
        'optimizer.schedule': trial.suggest_categorical('schedule', SCHEDULES),
    })
  if 'shape' in search:
    out.update({
        'train.batch_size': trial.suggest_categorical('batch_size', batch_sizes(config)),
        'model.remat_policy': trial.suggest_categorical('remat_policy', REMAT_POLICIES),
        'model.dtype': trial.suggest_categorical('dtype', DTYPES),
    })
  return out


def trial_config(base, overrides: dict, steps: int | None, evals: int):
  """A private copy of `base` with the overrides, the sweep's step count and `evals` evaluations."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  values = base.to_dict()
  for name, value in overrides.items():  # on the dict: an int may replace batch_size='auto'
    section, field = name.split('.')
    values[section][field] = value
  config = ml_collections.ConfigDict(values)
  if steps:
    config.train.steps = steps
  t = config.train
  t.eval_every = max(1, math.ceil(t.steps / max(evals, 1)))
  t.progress_bar = False
  config.checkpoint.update(every=0, keep=1, keep_best=0)  # slices and the end save anyway
  return config


def eval_losses(workdir: str) -> dict[int, float]:
  """step -> eval/loss from the trial's metrics.jsonl."""
  out = {}
  path = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue
        if 'eval/loss' in row:
          out[row['step']] = row['eval/loss']
  return out


def tokens_per_sec(workdir: str) -> float:
  """Median train/tokens_per_sec over the logged steps after the first (the first logged window
  holds the warm-up); the only one if there is one. NaN if none was logged."""
  from mlm_jax import rundir  # pylint: disable=import-outside-toplevel
  steps, values = rundir.read_metrics(workdir).get('train/tokens_per_sec', ([], []))
  by_step = dict(zip(steps, values))  # a step logged twice (resumed run): the later row
  speeds = [by_step[s] for s in sorted(by_step)]
  return statistics.median(speeds[1:] or speeds) if speeds else math.nan


def peak_memory(last: dict) -> tuple[int, str]:
  """(bytes, source): the trial's compiled train step's memory per device, as the trainer reported
  it (`compiled_step_bytes` of train_and_evaluate's result), or the process's peak RSS where the
  backend has no memory analysis."""
  if last.get('compiled_step_bytes') is not None:
    return int(last['compiled_step_bytes']), 'compiled'
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'rss'  # KiB on Linux


def measure(workdir: str, last: dict, objectives) -> dict:
  """A finished trial's objective values (loss and speed always: they cost nothing)."""
  out = {'loss': last.get('eval/loss', math.nan), 'tokens_per_sec': tokens_per_sec(workdir)}
  if 'peak_memory' in objectives:
    out['peak_memory'], out['peak_memory_source'] = peak_memory(last)
  return out


def run_trial(trial, base, workdir: str, steps: int | None, evals: int,
              lr_range: tuple[float, float], prune: bool = True, objectives=('loss',),
              search=('optimizer',)):
  """Trains one trial; returns its final eval loss (between evals it may be pruned) or, for other
  objectives, its values in `objectives` order."""
  import optuna  # pylint: disable=import-outside-toplevel

  from mlm_jax import train  # pylint: disable=import-outside-toplevel

  config = trial_config(base, {}, steps, evals)
  config = trial_config(config, suggest(trial, config, lr_range, search), None, evals)
  trial_dir = os.path.join(workdir, f'trial_{trial.number}')
  if os.path.exists(os.path.join(trial_dir, 'checkpoints')):
    raise RuntimeError(f'{trial_dir} exists from another study; use a new --workdir')
  trial.set_user_attr('workdir', trial_dir)
  t = config.train
  if tuple(objectives) != ('loss',):
    last = train.train_and_evaluate(config, trial_dir)  # in one piece: nothing to prune on
    values = measure(trial_dir, last, objectives)
    for name, value in values.items():
      trial.set_user_attr(name, value)
    logging.warning('trial %d: %s', trial.number, ', '.join(
        f'{o} {values[o]:.4g}' for o in objectives))
    out = tuple(float(values[o]) for o in objectives)
    return out if len(out) > 1 else out[0]
  for stop in range(t.eval_every, t.steps, t.eval_every):
    train.train_and_evaluate(config, trial_dir, stop_after=stop)
    loss = eval_losses(trial_dir).get(stop)
    if loss is None or not math.isfinite(loss):
      raise optuna.TrialPruned(f'no finite eval/loss at step {stop}')
    trial.report(loss, stop)
    logging.warning('trial %d step %d: eval/loss %.4f', trial.number, stop, loss)
    if prune and trial.should_prune():
      raise optuna.TrialPruned(f'pruned at step {stop} (eval/loss {loss:.4f})')
  last = train.train_and_evaluate(config, trial_dir)
  loss = last.get('eval/loss', math.nan)
  trial.report(loss, t.steps)
  return loss


def summary(study) -> list[dict]:
  """One row per trial, best first (pruned and failed trials after the completed ones)."""
  rows = []
  for t in study.trials:
    losses = t.intermediate_values
    last_step = max(losses) if losses else None
    rows.append({'trial': t.number, 'state': t.state.name.lower(),
                 'eval_loss': t.value if t.value is not None else (
                     losses[last_step] if last_step is not None else None),
                 'step': last_step, **t.params})
  done = lambda r: r['state'] == 'complete'
  key = lambda r: (not done(r), math.inf if r['eval_loss'] is None else r['eval_loss'])
  return sorted(rows, key=key)


def objective_summary(study, objectives) -> list[dict]:
  """One row per trial for an objectives study: its measured values, whether it is in the Pareto
  set (Optuna's best_trials), its params. Pareto trials first, by the first objective."""
  done = any(t.state.name == 'COMPLETE' for t in study.trials)
  front = {t.number for t in study.best_trials} if done else set()  # (best_trial raises if none)
  rows = []
  for t in study.trials:
    a = t.user_attrs
    rows.append({'trial': t.number, 'state': t.state.name.lower(), 'pareto': t.number in front,
                 **{o: a.get(o) for o in OBJECTIVES}, 'peak_memory_source': a.get(
                     'peak_memory_source'), **t.params})
  first = objectives[0]
  sign = -1 if OBJECTIVES[first] == 'maximize' else 1
  key = lambda r: (not r['pareto'], r['state'] != 'complete',
                   math.inf if r[first] is None else sign * r[first], r['trial'])
  return sorted(rows, key=key)


def _cell(v) -> str:
  if isinstance(v, float):
    return f'{v:,.0f}' if abs(v) >= 1e4 else f'{v:.4g}'  # tokens/s: 36,732 rather than 3.673e+04
  return '-' if v is None else str(v)


def format_table(rows: list[dict], cols=None) -> str:
  cols = cols or ('trial', 'state', 'eval_loss', 'step', 'learning_rate', 'warmup_ratio',
                  'weight_decay', 'clip_norm', 'b1', 'b2', 'schedule')
  table = [tuple(cols)] + [tuple(_cell(r.get(c)) for c in cols) for r in rows]
  widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
  lines = ['  '.join(v.rjust(w) for v, w in zip(row, widths)) for row in table]
  lines.insert(1, '  '.join('-' * w for w in widths))
  return '\n'.join(lines)


def _mib(row: dict) -> dict:
  """peak_memory shown in MiB (the summary keeps bytes)."""
  v = row.get('peak_memory')
  return {**row, 'peak_memory_MiB': None if v is None else v / 2**20}


def pareto_table(rows: list[dict], objectives) -> str:
  """The Pareto trials: objectives, then the params drawn."""
  front = [_mib(r) for r in rows if r['pareto']]
  params = [p for p in PARAMS if any(p in r for r in front)]
  names = ['peak_memory_MiB' if o == 'peak_memory' else o for o in objectives]
  return format_table(front, ['trial', *names, *params])


def plot_pareto(rows: list[dict], objectives, path: str) -> str:
  """Every pair of objectives: all completed trials in grey, the Pareto set in red (a point of a
  3-objective set can look dominated in one pair: it wins on the third)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  done = [_mib(r) for r in rows if r['state'] == 'complete']
  pairs = list(itertools.combinations(objectives, 2))
  fig, axes = plt.subplots(1, len(pairs), figsize=(4.5 * len(pairs), 4), squeeze=False,
                           constrained_layout=True)
  col = lambda o: 'peak_memory_MiB' if o == 'peak_memory' else o
  label = lambda o: f'{col(o)} ({"higher" if OBJECTIVES[o] == "maximize" else "lower"} is better)'
  for ax, (x, y) in zip(axes[0], pairs):
    for group, style in ((done, dict(c='0.7', label='trials')),
                         ([r for r in done if r['pareto']], dict(c='tab:red', label='Pareto set'))):
      ax.scatter([r[col(x)] for r in group], [r[col(y)] for r in group], s=25, **style)
    for r in done:
      if r['pareto']:
        ax.annotate(str(r['trial']), (r[col(x)], r[col(y)]), fontsize=7,
                    xytext=(3, 3), textcoords='offset points')
    ax.set_xlabel(label(x))
    ax.set_ylabel(label(y))
    ax.ticklabel_format(useOffset=False)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(f'{len(done)} trials, Pareto set numbered')
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def open_study(storage, objectives, space: dict, seed: int, population: int):
  """The study in `storage` (made if new), refused if it was made for another search."""
  import optuna  # pylint: disable=import-outside-toplevel
  objectives = tuple(objectives)
  if objectives == ('loss',):
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
  else:
    pruner = optuna.pruners.NopPruner()
  study = optuna.create_study(
      study_name='mlm_jax', storage=storage or None, load_if_exists=True,
      directions=[OBJECTIVES[o] for o in objectives], pruner=pruner)
  # Seeded past the trials already there: a rerun's random trials must not repeat the first run's.
  seed += len(study.trials)
  study.sampler = (optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
                   if len(objectives) > 1 else optuna.samplers.TPESampler(seed=seed))
  if 'space' not in study.user_attrs and not study.trials:
    study.set_user_attr('space', space)
  # A study from before --objectives has no record: it was eval loss over the optimizer fields.
  had = study.user_attrs.get('space', search_space(None))
  if had != space:
    raise SweepError(f'the study in --workdir was made for {had}, not {space}; use a new --workdir')
  return study


def sweep(base, workdir: str, trials: int, steps: int | None = None, evals: int = 4,
          lr_range: tuple[float, float] | None = None, prune: bool = True, seed: int = 0,
          storage: str | None = None, objectives=('loss',), search=('optimizer',),
          population: int = 10):
  """Runs `trials` more trials of the study in `workdir`; writes the summary (and with several
  objectives the Pareto plot); returns the study."""
  from mlm_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from mlm_jax import train  # pylint: disable=import-outside-toplevel

  objectives, search = tuple(objectives), tuple(search)
  config_lib.validate(trial_config(base, {}, steps, evals))  # a bad base fails before any trial
  lr = base.optimizer.learning_rate
  lr_range = lr_range or (lr / 10, lr * 10)
  os.makedirs(workdir, exist_ok=True)
  storage = storage if storage is not None else f'sqlite:///{os.path.abspath(workdir)}/optuna.db'
  study = open_study(storage, objectives, search_space(base, objectives, search), seed, population)
  study.optimize(lambda trial: run_trial(trial, base, workdir, steps, evals, lr_range, prune,
                                         objectives, search),
                 n_trials=trials, catch=(train.TrainingHalted,))
  if objectives == ('loss',):
    result = summary(study)
  else:
    rows = objective_summary(study, objectives)
    result = {'objectives': {o: OBJECTIVES[o] for o in objectives},
              'peak_memory': MEMORY_SOURCES.get(next(
                  (r['peak_memory_source'] for r in rows if r['peak_memory_source']), None)),
              'pareto': [r['trial'] for r in rows if r['pareto']], 'trials': rows}
    if len(objectives) > 1:
      try:
        plot_pareto(rows, objectives, os.path.join(workdir, 'pareto.png'))
      except ImportError:
        logging.warning("no pareto.png: plotting needs matplotlib (pip install 'mlm_jax[plot]')")
  with open(os.path.join(workdir, 'sweep_summary.json'), 'w') as f:
    json.dump(result, f, indent=2)
  return study


def best_overrides(study) -> str:
  """The best trial as --config flags for mlm_jax.main."""
  p = study.best_trial.params
  return ' '.join(f'--config.optimizer.{k}={p[k]}' for k in (
      'learning_rate', 'weight_decay', 'clip_norm', 'b1', 'b2', 'schedule') if k in p) + ''.join(
          f' --config.{s}.{k}={p[k]}' for s, k in (
              ('train', 'batch_size'), ('model', 'remat_policy'), ('model', 'dtype')) if k in p) + (
                  f' (warmup_ratio {p["warmup_ratio"]:.3f} of train.steps)'
                  if 'warmup_ratio' in p else '')


def report(study, workdir: str, objectives=('loss',)) -> str:
  """What the command prints: the trials (one objective) or the Pareto set (several), then one
  machine-readable RESULT line."""
  objectives = tuple(objectives)
  done = [t for t in study.trials if t.state.name == 'COMPLETE']
  if len(objectives) == 1:
    lines = [format_table(summary(study))] if objectives == ('loss',) else [format_table(
        objective_summary(study, objectives), ['trial', 'state', objectives[0], *PARAMS])]
    result = f'RESULT trials={len(study.trials)} complete={len(done)}'
    if done:
      best = study.best_trial
      name = 'eval/loss' if objectives == ('loss',) else objectives[0]
      lines += [f'best: trial {best.number}, {name} {best.value:.4f}',
                f'  {best_overrides(study)}']
      result += f' best_trial={best.number} best_{objectives[0]}={best.value:.6g}'
    return '\n'.join(lines + [result])
  rows = objective_summary(study, objectives)
  front = [r for r in rows if r['pareto']]
  lines = [f'Pareto set: {len(front)} of {len(done)} completed trials ({len(study.trials)} in all); '
           + ', '.join(f'{o} {"max" if OBJECTIVES[o] == "maximize" else "min"}'
                       for o in objectives)]
  if 'peak_memory' in objectives and front:
    lines.append(f'peak_memory: {MEMORY_SOURCES[front[0]["peak_memory_source"]]}')
  if front:
    lines.append(pareto_table(rows, objectives))
  png = os.path.join(workdir, 'pareto.png')
  if os.path.exists(png):
    lines.append(f'plot: {png}')
  lines.append(f'summary: {os.path.join(workdir, "sweep_summary.json")}')
  result = f'RESULT trials={len(study.trials)} complete={len(done)} pareto={len(front)}'
  for o in objectives:
    pick = max if OBJECTIVES[o] == 'maximize' else min
    values = [r[o] for r in rows if r['state'] == 'complete' and r[o] is not None]
    if values:
      best = pick(values)
      result += f' best_{o}={best}' if isinstance(best, int) else f' best_{o}={best:.6g}'
  return '\n'.join(lines + [result])


def define_flags():
  config_flags.DEFINE_config_file('config', None, 'Base training config (configs/*.py).')
  flags.DEFINE_integer('trials', 10, 'Trials to run (added to the study in --workdir).')
  flags.DEFINE_integer('steps', None, 'train.steps of each trial (default: the config\'s).')
  flags.DEFINE_integer('evals', 4, 'Evaluations per trial: the points where pruning may happen.')
  flags.DEFINE_string('workdir', None, 'Sweep directory: trial_K/ run dirs, optuna.db, summary.')
  flags.DEFINE_string('lr_range', '', 'min,max learning rate (default: config value /10 .. x10).')
  flags.DEFINE_bool('prune', True, 'Prune trials whose intermediate eval loss is poor (objective '
                    'loss alone).')
  flags.DEFINE_string('objectives', 'loss', 'Comma-separated: loss (min), tokens_per_sec (max), '
                      'peak_memory (min). Several: an NSGA-II study and its Pareto set.')
  flags.DEFINE_string('search', 'optimizer', 'Comma-separated: optimizer (learning rate, warmup, '
                      'decay, clipping, Adam betas, schedule), shape (batch size, remat, dtype).')
  flags.DEFINE_integer('population', 10, 'NSGA-II population size (several objectives): the first '
                       'this many trials are random.')
  flags.DEFINE_integer('sampler_seed', 0, 'Seed of the sampler.')
  flags.DEFINE_string('storage', None, 'Optuna storage URL (default: sqlite in --workdir; '
                      "'' = in memory).")
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if not f['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # one line per eval instead of the training log
  try:
    import optuna  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    sys.exit("error: the sweep needs optuna: pip install 'mlm_jax[sweep]'")
  from mlm_jax.errors import ConfigError, DataError  # pylint: disable=import-outside-toplevel
  lr_range = tuple(float(x) for x in f.lr_range.split(',')) if f.lr_range else None
  try:
    objectives = parse_names(f.objectives, tuple(OBJECTIVES), 'objectives')
    search = parse_names(f.search, SEARCHES, 'search')
    study = sweep(f.config, f.workdir, f.trials, f.steps, f.evals, lr_range, f.prune,
                  f.sampler_seed, f.storage, objectives, search, f.population)
  except (ConfigError, DataError, SweepError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(report(study, f.workdir, objectives))


if __name__ == '__main__':
  define_flags()
  app.run(main)
