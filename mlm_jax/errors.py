"""Errors that stop a run at start-up with a one-line message naming the culprit."""


class ConfigError(ValueError):
  """A config field is missing, unknown or has a bad value. The message names the field."""

  def __init__(self, field: str, message: str):
    self.field = field
    super().__init__(f"config.{field}: {message}")


class DataError(ValueError):
  """Input data cannot be used (no files, unreadable file, empty corpus, bad line)."""
