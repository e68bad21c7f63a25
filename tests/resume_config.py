"""The tiny config of tests/test_resume.py, as a config file for the CLI."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.test_resume import tiny  # noqa: E402


def get_config():
  return tiny()
