"""Command line: python -m mlm_jax.main --config=configs/quickstart.py --workdir=DIR [--config.x.y=v].

Kept thin on purpose: everything happens in `train.train_and_evaluate(config, workdir)`.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mlm_jax.errors import ConfigError, DataError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and logs.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from mlm_jax import train  # after flag parsing, so --help stays fast
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, DataError, train.TrainingHalted) as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def parse_flags(argv):
  """absl flag parsing, with config mistakes (e.g. --config.model.hiden_size) as one clear line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {e}\nPass --help for usage.')
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e).strip('\'"').replace('\\n', ' ').replace('\n', ' ').replace("\\'", "'")
    sys.exit(f'error: bad --config override: {message}')


def run():
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
