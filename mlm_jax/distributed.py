"""Multi-process start-up through JAX's own runtime (jax.distributed); single-process runs need nothing.

- Cloud TPU pod slices and SLURM: `jax.distributed.initialize()` finds the coordinator itself.
- Plain hosts: pass --coordinator_address=host:port --num_processes=N --process_id=i on every host.
"""
import os

import jax
from absl import logging


def _in_multiprocess_cluster() -> bool:
  """Environments where jax.distributed.initialize() auto-detects a multi-process job."""
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_JOB_ID' in os.environ:
    return True
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return ',' in hosts or 'MEGASCALE_COORDINATOR_ADDRESS' in os.environ


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  explicit = coordinator_address is not None or num_processes is not None
  if not explicit and not _in_multiprocess_cluster():
    return
  if (os.environ.get('JAX_PLATFORMS', '') == 'cpu' or not _has_accelerator()):
    # CPU processes talk through gloo (the test path: several processes on one machine).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if explicit:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def _has_accelerator() -> bool:
  # Before initialize(), jax.devices() must not be called (it would start a 1-process backend),
  # so look for the plugins instead.
  import importlib.util
  return any(importlib.util.find_spec(m) is not None for m in ('jax_cuda12_plugin', 'libtpu',
                                                                'jax_cuda13_plugin'))
