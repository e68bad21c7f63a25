"""Preemption: SIGTERM/SIGINT become "save a checkpoint and stop at the next step boundary".

Single process: a signal sets a flag, checked once per step. Multi-process (jax.distributed): the
coordination service's preemption notifier owns SIGTERM; `should_stop(step)` asks orbax's
`reached_preemption(step)`, which is the same step on every process, so all of them save the same
step even when only one was signalled.
"""
import signal
import threading
import time
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp


class Preemption:
  """A stop flag set by SIGTERM/SIGINT; `should_stop(step)` is the same on every host."""

  def __init__(self):
    self._flag = threading.Event()
    self._previous: dict[int, Any] = {}
    self.signalled_at: float | None = None  # time.monotonic() of the first stop signal

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self._flag.is_set():
      signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))
      raise KeyboardInterrupt
    self._flag.set()
    if self.signalled_at is None:
      self.signalled_at = time.monotonic()
    logging.warning('Received %s: saving a checkpoint and stopping after this step '
                    '(Ctrl-C again to abort at once).', signal.Signals(signum).name)

  def install(self) -> 'Preemption':
    signals = [signal.SIGINT]
    # Under jax.distributed the coordination service owns SIGTERM: its preemption notifier
    # makes every host stop at the same step. Replacing its handler would break that.
    if not _distributed():
      signals.append(signal.SIGTERM)
    for s in signals:
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def uninstall(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()

  def should_stop(self, step: int) -> bool:
    """Call every step on every host. Multi-host: only the JAX preemption sync point counts, since
    a local signal on one host would make the hosts disagree (and hang in the next collective)."""
    if _distributed():
      if self._flag.is_set():
        logging.log_first_n(logging.WARNING, 'Local stop signal ignored under multi-host; '
                            'send SIGTERM to use the preemption sync point.', 1)
      stop = ocp.multihost.reached_preemption(step)  # False if the service is off
      if stop and self.signalled_at is None:
        self.signalled_at = time.monotonic()
      return stop
    return self._flag.is_set()

  def seconds_since_signal(self) -> float | None:
    return None if self.signalled_at is None else time.monotonic() - self.signalled_at


_current: Preemption | None = None


def _distributed() -> bool:
  return jax.process_count() > 1 or ocp.multihost.is_jax_distributed_client_initialized()


def install() -> Preemption:
  """Sets a stop flag on SIGTERM/SIGINT (a second SIGINT raises KeyboardInterrupt). Main thread."""
  global _current
  if _current is not None:
    _current.uninstall()
  _current = Preemption().install()
  return _current


def should_stop(step: int) -> bool:
  """`should_stop` of the installed handler; without one, only the multi-host sync point counts."""
  if _current is not None:
    return _current.should_stop(step)
  return _distributed() and ocp.multihost.reached_preemption(step)
