"""Hyperparameter search with Optuna over short runs, pruning on the intermediate eval loss.

  python tools/sweep.py --config=configs/quickstart.py --trials=20 --steps=200 --workdir=runs/sweep
      [--evals=4] [--lr_range=1e-4,1e-2] [--no_prune] [--config.train.batch_size=16 ...]

Searches learning rate (log scale), warmup ratio, weight decay, clip norm, Adam b1/b2 and the
schedule; everything else comes from --config. Trial K trains in WORKDIR/trial_K, in slices that end
at each eval (train_and_evaluate(stop_after=...); resume is bitwise exact, so slicing does not change
the numbers); after each slice its eval/loss goes to Optuna, which may prune the trial. The study
lives in WORKDIR/optuna.db, so running the command again adds trials to it. Prints a table at the
end and writes WORKDIR/sweep_summary.json. Needs optuna (pip install 'mlm_jax[sweep]').
"""
import json
import math
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

CLIP_NORMS = (0.0, 0.5, 1.0, 2.0)
B2S = (0.98, 0.99, 0.995, 0.999)
SCHEDULES = ('cosine', 'linear', 'constant')


def suggest(trial, config, lr_range: tuple[float, float]) -> dict:
  """Draws one trial's optimizer fields; returns them as dotted config overrides."""
  steps = config.train.steps
  warmup_ratio = trial.suggest_float('warmup_ratio', 0.0, 0.2)
  return {
      'optimizer.learning_rate': trial.suggest_float('learning_rate', *lr_range, log=True),
      'optimizer.warmup_steps': int(round(warmup_ratio * steps)),
      'optimizer.weight_decay': trial.suggest_float('weight_decay', 0.0, 0.1),
      'optimizer.clip_norm': trial.suggest_categorical('clip_norm', CLIP_NORMS),
      'optimizer.b1': trial.suggest_float('b1', 0.85, 0.95),
      'optimizer.b2': trial.suggest_categorical('b2', B2S),
      'optimizer.schedule': trial.suggest_categorical('schedule', SCHEDULES),
  }


def trial_config(base, overrides: dict, steps: int | None, evals: int):
  """A private copy of `base` with the overrides, the sweep's step count and `evals` evaluations."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict(base.to_dict())
  if steps:
    config.train.steps = steps
  t = config.train
  t.eval_every = max(1, math.ceil(t.steps / max(evals, 1)))
  t.progress_bar = False
  config.checkpoint.update(every=0, keep=1, keep_best=0)  # slices and the end save anyway
  for name, value in overrides.items():
    section, field = name.split('.')
    config[section][field] = value
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


def run_trial(trial, base, workdir: str, steps: int | None, evals: int,
              lr_range: tuple[float, float], prune: bool = True) -> float:
  """Trains one trial in slices between evals; returns its final eval loss."""
  import optuna  # pylint: disable=import-outside-toplevel

  from mlm_jax import train  # pylint: disable=import-outside-toplevel

  config = trial_config(base, {}, steps, evals)
  config = trial_config(config, suggest(trial, config, lr_range), None, evals)
  trial_dir = os.path.join(workdir, f'trial_{trial.number}')
  if os.path.exists(os.path.join(trial_dir, 'checkpoints')):
    raise RuntimeError(f'{trial_dir} exists from another study; use a new --workdir')
  trial.set_user_attr('workdir', trial_dir)
  t = config.train
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


def format_table(rows: list[dict]) -> str:
  cols = ('trial', 'state', 'eval_loss', 'step', 'learning_rate', 'warmup_ratio', 'weight_decay',
          'clip_norm', 'b1', 'b2', 'schedule')

  def cell(v):
    if isinstance(v, float):
      return f'{v:.4g}'
    return '-' if v is None else str(v)

  table = [cols] + [tuple(cell(r.get(c)) for c in cols) for r in rows]
  widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
  lines = ['  '.join(v.rjust(w) for v, w in zip(row, widths)) for row in table]
  lines.insert(1, '  '.join('-' * w for w in widths))
  return '\n'.join(lines)


def sweep(base, workdir: str, trials: int, steps: int | None = None, evals: int = 4,
          lr_range: tuple[float, float] | None = None, prune: bool = True, seed: int = 0,
          storage: str | None = None):
  """Runs `trials` more trials of the study in `workdir`; returns the study."""
  import optuna  # pylint: disable=import-outside-toplevel

  from mlm_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from mlm_jax import train  # pylint: disable=import-outside-toplevel

  config_lib.validate(trial_config(base, {}, steps, evals))  # a bad base fails before any trial
  lr = base.optimizer.learning_rate
  lr_range = lr_range or (lr / 10, lr * 10)
  os.makedirs(workdir, exist_ok=True)
  storage = storage if storage is not None else f'sqlite:///{os.path.abspath(workdir)}/optuna.db'
  study = optuna.create_study(
      study_name='mlm_jax', storage=storage or None, load_if_exists=True, direction='minimize',
      sampler=optuna.samplers.TPESampler(seed=seed),
      pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
  study.optimize(lambda trial: run_trial(trial, base, workdir, steps, evals, lr_range, prune),
                 n_trials=trials, catch=(train.TrainingHalted,))
  rows = summary(study)
  with open(os.path.join(workdir, 'sweep_summary.json'), 'w') as f:
    json.dump(rows, f, indent=2)
  return study


def best_overrides(study) -> str:
  """The best trial as --config flags for mlm_jax.main."""
  p = study.best_trial.params
  return ' '.join(f'--config.optimizer.{k}={p[k]}' for k in (
      'learning_rate', 'weight_decay', 'clip_norm', 'b1', 'b2', 'schedule')) + (
          f' (warmup_ratio {p["warmup_ratio"]:.3f} of train.steps)')


def define_flags():
  config_flags.DEFINE_config_file('config', None, 'Base training config (configs/*.py).')
  flags.DEFINE_integer('trials', 10, 'Trials to run (added to the study in --workdir).')
  flags.DEFINE_integer('steps', None, 'train.steps of each trial (default: the config\'s).')
  flags.DEFINE_integer('evals', 4, 'Evaluations per trial: the points where pruning may happen.')
  flags.DEFINE_string('workdir', None, 'Sweep directory: trial_K/ run dirs, optuna.db, summary.')
  flags.DEFINE_string('lr_range', '', 'min,max learning rate (default: config value /10 .. x10).')
  flags.DEFINE_bool('prune', True, 'Prune trials whose intermediate eval loss is poor.')
  flags.DEFINE_integer('sampler_seed', 0, 'Seed of the TPE sampler.')
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
    study = sweep(f.config, f.workdir, f.trials, f.steps, f.evals, lr_range, f.prune,
                  f.sampler_seed, f.storage)
  except (ConfigError, DataError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(format_table(summary(study)))
  if any(t.state.name == 'COMPLETE' for t in study.trials):
    print(f'best: trial {study.best_trial.number}, eval/loss {study.best_value:.4f}')
    print(f'  {best_overrides(study)}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
