"""Per-device memory of the train state (parameters + optimizer state) for several fsdp sizes.

  python tools/state_memory.py --config=configs/domainbert.py [--devices 8] [--fsdp 1,2,4,8]

Exact bytes from the state's shardings (no arrays are made, nothing is compiled): what FSDP saves
per device. Runs on `--devices` fake CPU devices, so it needs no accelerator. Activations and
temporaries are not included (see docs/performance.md for the compiled step's memory).
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_DEVICES = flags.DEFINE_integer('devices', 8, 'Fake CPU devices to lay the mesh out on.')
_FSDP = flags.DEFINE_list('fsdp', ['1', '2', '4', '8'], 'fsdp axis sizes to report.')


def state_bytes(trainer) -> tuple[int, int]:
  """(total bytes of the train state, bytes held by one device)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  total = per_device = 0
  for x in jax.tree.leaves(trainer.abstract_state):
    itemsize = np.dtype(x.dtype).itemsize
    total += x.size * itemsize
    per_device += int(np.prod(x.sharding.shard_shape(x.shape))) * itemsize
  return total, per_device


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from mlm_jax import train  # pylint: disable=import-outside-toplevel
  from mlm_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  config = flags.FLAGS.config
  for fsdp in map(int, _FSDP.value):
    config.sharding.fsdp, config.sharding.data = fsdp, -1
    config.train.grad_accum_steps = 1
    config.train.batch_size = _DEVICES.value  # only the state matters here
    try:
      trainer = train.Trainer(config)
    except ConfigError as e:
      print(f'error: {e}', file=sys.stderr)
      return 2
    total, per_device = state_bytes(trainer)
    print(f'fsdp={fsdp}: state {total / 2**20:.1f} MiB, per device {per_device / 2**20:.1f} MiB')
  return 0


if __name__ == '__main__':
  # The fake device count must be in XLA_FLAGS before jax is imported, so read --devices here.
  argv, count = sys.argv, '8'
  for i, a in enumerate(argv):
    if a.startswith('--devices='):
      count = a.split('=', 1)[1]
    elif a == '--devices' and i + 1 < len(argv):
      count = argv[i + 1]
  os.environ['JAX_PLATFORMS'] = 'cpu'  # before jax is imported
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                             + f' --xla_force_host_platform_device_count={count}')
  config_flags.DEFINE_config_file('config', None, 'Training config file (configs/*.py).')
  flags.mark_flags_as_required(['config'])
  app.run(lambda a: sys.exit(main(a)))
