"""Test setup: 8 fake CPU devices so every test exercises the sharded code path."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--runslow") or os.environ.get("MLM_JAX_SLOW") == "1":
    return
  skip = pytest.mark.skip(reason="slow: use --runslow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
