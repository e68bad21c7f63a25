"""Process settings for speed, applied by re-executing the interpreter once before jax is imported.

Allocator and XLA settings are read when the process (or XLA) starts, so they cannot be set from
inside a running program. `relaunch_if_needed()` is the first call of the CLI and of
tools/benchmark.py: if a setting is missing from the environment it re-executes the same command
line with the settings added, marked by MLM_JAX_LAUNCHED so that it happens once. A value the user
already set is never overridden. Opt out with MLM_JAX_NO_LAUNCH=1. docs/performance.md has the
measurements behind each setting.

This module must not import jax.
"""
import os
import sys

GUARD = 'MLM_JAX_LAUNCHED'  # set in the re-executed process
OPT_OUT = 'MLM_JAX_NO_LAUNCH'  # '1': leave the process as it is

# glibc malloc: XLA allocates and frees its large step buffers (activations, gradients) every
# step. By default glibc serves blocks above a dynamic threshold with mmap and returns freed memory
# to the kernel, so each step maps fresh pages and the kernel zeroes them again (page faults, time in
# the kernel). Serving them from the heap and never trimming it keeps the pages mapped between steps.
_ENV = {
    'MALLOC_MMAP_THRESHOLD_': str(1 << 25),  # heap, not mmap, up to 32 MiB: glibc's largest allowed
    'MALLOC_TRIM_THRESHOLD_': str(1 << 34),  # never give the heap's top back to the kernel
    'MALLOC_TOP_PAD_': str(1 << 26),  # grow the heap 64 MiB at a time
}
# tcmalloc (Debian/Ubuntu package libtcmalloc-minimal4), preloaded where installed: it keeps freed
# large blocks for reuse too, and is faster than glibc's malloc for many threads.
_TCMALLOC = ('/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4',
             '/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4',
             '/usr/lib64/libtcmalloc_minimal.so.4', '/usr/lib/libtcmalloc_minimal.so.4')
_TCMALLOC_ENV = {'TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD': str(1 << 40)}  # no "large alloc" lines
# XLA flags appended to XLA_FLAGS unless a flag of the same name is already there.
_XLA_FLAGS = ()


def _flag_name(flag: str) -> str:
  return flag.split('=', 1)[0]


def tcmalloc_path() -> str | None:
  return next((p for p in _TCMALLOC if os.path.exists(p)), None)


def _settings() -> dict:
  tcmalloc = tcmalloc_path()
  return {**_ENV, **(_TCMALLOC_ENV if tcmalloc else {})}


def launch_env(env) -> dict:
  """`env` plus the settings it lacks."""
  env = dict(env)
  for key, value in _settings().items():
    env.setdefault(key, value)
  preload = env.get('LD_PRELOAD', '').split()
  tcmalloc = tcmalloc_path()
  if tcmalloc and not any('malloc' in p for p in preload):  # the user's own allocator wins
    env['LD_PRELOAD'] = ' '.join([*preload, tcmalloc])
  have = {_flag_name(f) for f in env.get('XLA_FLAGS', '').split()}
  extra = [f for f in _XLA_FLAGS if _flag_name(f) not in have]
  if extra:
    env['XLA_FLAGS'] = ' '.join([*env.get('XLA_FLAGS', '').split(), *extra])
  return env


def plain_env(env) -> dict:
  """`env` without the settings (and the guard) this module adds: a process as a user starts it."""
  settings = _settings()
  env = {k: v for k, v in env.items() if k != GUARD and not (k in settings and settings[k] == v)}
  preload = [p for p in env.get('LD_PRELOAD', '').split() if p != tcmalloc_path()]
  if preload:
    env['LD_PRELOAD'] = ' '.join(preload)
  else:
    env.pop('LD_PRELOAD', None)
  flags = [f for f in env.get('XLA_FLAGS', '').split() if f not in _XLA_FLAGS]
  if flags:
    env['XLA_FLAGS'] = ' '.join(flags)
  else:
    env.pop('XLA_FLAGS', None)
  return env


def describe() -> str:
  """A short note of what this process runs with, for logs and benchmark output."""
  if os.environ.get(OPT_OUT) == '1':
    return 'off (MLM_JAX_NO_LAUNCH=1)'
  if not os.environ.get(GUARD):
    return 'not launched'
  return 'on (tcmalloc)' if 'tcmalloc' in os.environ.get('LD_PRELOAD', '') else 'on (glibc malloc)'


def relaunch_if_needed() -> None:
  """Re-execute this command line once with the settings, unless opted out or already done."""
  if os.environ.get(OPT_OUT) == '1' or os.environ.get(GUARD):
    return
  env = launch_env(os.environ)
  env[GUARD] = '1'
  if env == {**os.environ, GUARD: '1'}:  # nothing to add: no need to start again
    os.environ[GUARD] = '1'
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
