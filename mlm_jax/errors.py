"""Errors that stop a run at start-up with a one-line message naming the culprit."""


class ConfigError(ValueError):
  """A config field is missing, unknown or has a bad value. The message names the field."""

  def __init__(self, field: str, message: str):
    self.field = field
    super().__init__(f"config.{field}: {message}")


class DataError(ValueError):
  """Input data cannot be used (no files, unreadable file, empty corpus, bad line)."""


def quiet_closed_event_loop_callbacks() -> None:
  """Drops the 'Event loop is closed' noise of a failed orbax read.

  When one tensorstore read of a checkpoint fails, orbax's `asyncio.run` ends and closes its loop
  while sibling reads are still in flight; their completion callbacks then call
  `loop.call_soon_threadsafe` on the closed loop, and Python prints one traceback per callback as
  an "unraisable" exception (over a hundred for one corrupt checkpoint). The failure itself is
  reported by the checkpointer; these late callbacks carry no information. Everything else goes to
  the previous hook.
  """
  import sys
  previous = sys.unraisablehook

  def hook(unraisable):
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == 'Event loop is closed':
      return
    previous(unraisable)

  sys.unraisablehook = hook


def fail(error: Exception):
  """An expected failure ends a CLI: the whole message in the log, one `error:` line on stderr,
  status 2. Checkpoints and metrics already written stay as they are."""
  import sys
  from absl import logging
  logging.error('%s', error)
  line = ' '.join(part.strip() for part in str(error).splitlines() if part.strip())
  sys.stderr.flush()
  print(f'error: {line}', file=sys.stderr)
  sys.exit(2)
