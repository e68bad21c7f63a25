"""Command line: python -m mlm_jax.main --config=configs/quickstart.py --workdir=DIR [--config.x.y=v].

Kept thin on purpose: everything happens in `train.train_and_evaluate(config, workdir)`.
"""
import errno
import sys

from absl import app, flags
from ml_collections import config_flags

from mlm_jax import launch
from mlm_jax import errors
from mlm_jax.errors import ConfigError, DataError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and logs.')
_STOP_AFTER = flags.DEFINE_integer(
    'stop_after', None, 'Stop (with a checkpoint) at this step, as a preemption would; running '
    'again without it continues exactly.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'Multi-process on plain hosts: host:port of process 0 '
    '(Cloud TPU and SLURM are detected without it).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-process: number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-process: this process\'s index.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # After flag parsing (--help stays fast) and before anything touches a JAX backend.
  from mlm_jax import autotune, checkpoint, distributed, train
  errors.quiet_closed_event_loop_callbacks()
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, stop_after=_STOP_AFTER.value)
  except (ConfigError, DataError, checkpoint.CheckpointError, train.TrainingHalted,
          autotune.OutOfMemory) as e:
    errors.fail(e)
  except OSError as e:  # a full disk while writing metrics or events: not a bug, say what to do
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
      raise
    errors.fail(OSError(e.errno, f'{e.strerror} while writing in {_WORKDIR.value}; free some space and '
                 'run the same command again to continue from the last checkpoint'))


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
  launch.relaunch_if_needed()  # allocator settings must be in place before the process starts
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
