"""The device mesh ('data', 'fsdp'), parameter and batch shardings, and multi-process helpers."""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mlm_jax.errors import ConfigError

BATCH_AXES = ('data', 'fsdp')  # the batch is split over every device


def make_mesh(config, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  n, fsdp = len(devices), config.sharding.fsdp
  data = config.sharding.data if config.sharding.data != -1 else n // fsdp
  if data * fsdp != n:
    raise ConfigError('sharding', f'data={data} x fsdp={fsdp} does not use the {n} devices exactly')
  accum = config.train.grad_accum_steps or 1  # 0 = auto: checked when it is picked
  if config.train.batch_size % n or (config.train.batch_size // accum) % n:
    raise ConfigError('train.batch_size',
                      f'{config.train.batch_size} sequences (micro-batch '
                      f'{config.train.batch_size // accum}) must split evenly '
                      f'over {n} devices')
  return jax.make_mesh((data, fsdp), BATCH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def param_spec(shape, fsdp: int) -> PartitionSpec:
  """FSDP: shard the largest dimension that the fsdp axis divides; replicate small/odd ones."""
  if fsdp == 1 or not shape:
    return PartitionSpec()
  dims = sorted(range(len(shape)), key=lambda d: -shape[d])
  for d in dims:
    if shape[d] % fsdp == 0 and shape[d] >= fsdp:
      spec = [None] * len(shape)
      spec[d] = 'fsdp'
      return PartitionSpec(*spec)
  return PartitionSpec()


def state_shardings(abstract_state, mesh: Mesh):
  fsdp = mesh.shape['fsdp']
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x.shape, fsdp)), abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def abstract_batch(local_batch: dict, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """Global shapes (every process's rows) and shardings of a batch like `local_batch`."""
  sharding = batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct((v.shape[0] * jax.process_count(), *v.shape[1:]), v.dtype,
                                  sharding=sharding)
          for k, v in sorted(local_batch.items())}


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows -> one global array per key, sharded over all devices of all processes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
