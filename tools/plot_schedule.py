"""Dry run of a config's learning-rate schedule: prints a few values and plots it, without training.

  python tools/plot_schedule.py --config=configs/quickstart.py [--config.optimizer.warmup_steps=50]
      [--out schedule.png]

The schedule is mlm_jax.optim.learning_rate_schedule, the one training uses, indexed by optimizer
step (gradient accumulation does not stretch it). --out may be local or gs://. Needs matplotlib
(pip install 'mlm_jax[plot]').
"""
import io
import os
import sys

if __name__ == '__main__':  # a program, not an import: never grab an accelerator
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # before jax is imported

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402


def milestones(config) -> list[tuple[str, int]]:
  last = config.train.steps - 1
  warmup = min(config.optimizer.warmup_steps, last)
  if config.optimizer.schedule == 'wsd':  # the decay is the part worth seeing
    start = decay_start(config)
    return [('first', 0), ('end of warmup', warmup), ('start of decay', min(start, last)),
            ('middle of decay', min((start + last + 1) // 2, last)), ('last', last)]
  return [('first', 0), ('end of warmup', warmup), ('middle', (warmup + last) // 2), ('last', last)]


def decay_start(config) -> int:
  """schedule='wsd': the first step of the 1-sqrt decay (the one before is the last at the peak)."""
  from mlm_jax import optim  # pylint: disable=import-outside-toplevel
  return config.train.steps - optim.wsd_decay_steps(config)


def schedule_values(config, points: int = 2000) -> tuple[np.ndarray, np.ndarray]:
  """(steps, learning rates): step s is the (s+1)-th update, the one a log line at step s+1 reports.
  At most `points` steps, always including the milestones."""
  from mlm_jax import optim  # pylint: disable=import-outside-toplevel
  schedule = optim.learning_rate_schedule(config)
  steps_S = np.unique(np.concatenate([
      np.linspace(0, config.train.steps - 1, points).astype(np.int64),
      [s for _, s in milestones(config)]]))
  return steps_S, np.asarray(schedule(steps_S), np.float64)


def plot(config, out: str) -> str:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  steps_S, lr_S = schedule_values(config)
  o = config.optimizer
  fig, ax = plt.subplots(figsize=(6, 3.4), constrained_layout=True)
  ax.plot(steps_S, lr_S)
  ax.axvline(o.warmup_steps, color='gray', ls=':', label=f'end of warmup ({o.warmup_steps})')
  if o.schedule == 'wsd':
    ax.axvline(decay_start(config), color='gray', ls='--',
               label=f'start of 1-sqrt decay ({decay_start(config)})')
  ax.set_title(f'{o.schedule} schedule, peak {o.learning_rate:g}, end ratio {o.end_lr_ratio:g}')
  ax.set_xlabel('optimizer step (0 = first update)')
  ax.set_ylabel('learning rate')
  ax.grid(alpha=0.3)
  ax.legend()
  image = io.BytesIO()  # then written whole, local or gs://
  fig.savefig(image, format=os.path.splitext(out)[1][1:] or 'png', dpi=100)
  plt.close(fig)
  from mlm_jax import paths  # pylint: disable=import-outside-toplevel
  paths.write_atomic(out, image.getvalue())
  return out


def report(config) -> str:
  steps_S, lr_S = schedule_values(config)
  lr = dict(zip(steps_S.tolist(), lr_S.tolist()))
  decay = (f', decay {config.train.steps - decay_start(config)}'
           if config.optimizer.schedule == 'wsd' else '')
  lines = [f'{config.optimizer.schedule} schedule over {config.train.steps} steps '
           f'(warmup {config.optimizer.warmup_steps}{decay}):']
  for name, step in milestones(config):
    lines.append(f'  step {step:>7d} ({name}): lr {lr[step]:.4g}')
  return '\n'.join(lines)


def define_flags():
  config_flags.DEFINE_config_file('config', None, 'Training config file (configs/*.py).')
  flags.DEFINE_string('out', 'schedule.png', 'PNG to write.')
  flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from mlm_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from mlm_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  config = flags.FLAGS.config
  try:
    config_lib.validate(config)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(report(config))
  print(plot(config, flags.FLAGS.out))


if __name__ == '__main__':
  define_flags()
  app.run(main)
