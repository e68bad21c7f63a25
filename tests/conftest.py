"""Test setup: 8 fake CPU devices so every test exercises the sharded code path, and a compilation
cache shared by the whole session (identical programs compiled by different tests compile once).
JAX_PLATFORMS set beforehand wins: tools/gpu_check.sh runs the tests that hold on one device with
JAX_PLATFORMS=cuda on the GPU."""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("MLM_JAX_TEST_CACHE", os.path.join(tempfile.gettempdir(),
                                                                   "mlm_jax_test_jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
_ABSL_LEVEL = absl_logging.get_absl_logger().level  # what a test starts with


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--runslow") or os.environ.get("MLM_JAX_SLOW") == "1":
    return
  skip = pytest.mark.skip(reason="slow: use --runslow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


def need(module: str):
  """`pytest.importorskip(module)`, except in CI (MLM_JAX_CI=1, set by .ci/run), where an optional
  package the tests need must be installed: a missing one fails instead of silently skipping."""
  if os.environ.get("MLM_JAX_CI") == "1":
    import importlib  # pylint: disable=import-outside-toplevel
    return importlib.import_module(module)
  return pytest.importorskip(module)


@pytest.fixture(autouse=True)
def _absl_level_as_at_start():
  """CLIs run in-process (predict, export_hf, sweep, fault_trial's digest) lower absl's verbosity
  for their own output, and a module fixture may have run one: every test starts with absl's logger
  at the session's own level, so a test that reads the log (caplog) sees what it asserts."""
  absl_logging.get_absl_logger().setLevel(_ABSL_LEVEL)
  yield

