"""Byte-offset index of the records in a text file, built once with numpy and cached on disk.

A record is a non-empty line ('line') or a run of non-empty lines ('block'), with surrounding
whitespace trimmed. The index holds start/end offsets and a blake2b hash of each record's bytes
(the default split key), so the corpus itself is never held in memory.
"""
import hashlib
import os
import tempfile

import numpy as np
from absl import logging

from mlm_jax.errors import DataError

_VERSION = 2
_BLOCK = 16 << 20
_WS = np.zeros(256, bool)
_WS[[9, 10, 11, 12, 13, 32]] = True


def _line_spans(buf: np.ndarray, base: int):
  """Per line of `buf` (which ends with a newline): trimmed [first, end) absolute offsets."""
  nl = np.flatnonzero(buf == 10)
  starts = np.concatenate([[0], nl[:-1] + 1])
  content = np.flatnonzero(~_WS[buf])
  if not len(content):
    return nl + base, nl + base
  # First non-space byte at or after each line start; last one before each newline.
  i = np.searchsorted(content, starts)
  j = np.searchsorted(content, nl) - 1
  first = np.where(i < len(content), content[np.minimum(i, len(content) - 1)], nl)
  last = np.where(j >= 0, content[np.maximum(j, 0)], -1)
  empty = first >= nl
  end = np.where(empty, first, last + 1)
  first = np.where(empty, end, first)
  return first + base, end + base


def _blocks(path):
  """Yields (uint8 array ending with a newline, absolute offset of its first byte)."""
  offset, carry = 0, b''
  with open(path, 'rb') as f:
    while True:
      data = f.read(_BLOCK)
      if not data:
        break
      data = carry + data
      cut = data.rfind(b'\n') + 1
      if cut == 0:
        carry = data
        continue
      yield np.frombuffer(data, np.uint8, cut), offset
      offset += cut
      carry = data[cut:]
  if carry:
    yield np.frombuffer(carry + b'\n', np.uint8), offset


def _records(path, unit):
  """(start_N, end_N) of every record in the file."""
  starts, ends, empty = [], [], 0
  open_start, open_end = -1, -1  # a block still open at the end of the previous buffer
  for buf, base in _blocks(path):
    first, end = _line_spans(buf, base)
    full = first < end
    if unit == 'line':
      empty += int((~full).sum())
      starts.append(first[full])
      ends.append(end[full])
      continue
    # Blocks: runs of consecutive non-empty lines.
    prev_full = np.concatenate([[open_start >= 0], full[:-1]])
    next_full = np.concatenate([full[1:], [True]])  # the last line's run may continue
    run_start = full & ~prev_full
    run_end = full & ~next_full
    s, e = first[run_start], end[run_end]
    if open_start >= 0:
      if full[0]:
        s = np.concatenate([[open_start], s])
      else:  # the open block ended at the previous buffer's end
        starts.append(np.array([open_start]))
        ends.append(np.array([open_end]))
    # The trailing run (if any) stays open: e lacks its end.
    if full[-1]:
      open_start, open_end = int(s[-1]), int(end[-1])
      s = s[:-1]
    else:
      open_start = -1
    starts.append(s)
    ends.append(e)
  if open_start >= 0:
    starts.append(np.array([open_start]))
    ends.append(np.array([open_end]))
  cat = lambda xs: np.concatenate(xs).astype(np.int64) if xs else np.zeros(0, np.int64)
  return cat(starts), cat(ends), empty


def _hashes(path, start_N, end_N):
  out = np.zeros(len(start_N), np.uint64)
  with open(path, 'rb') as f:
    pos = 0
    for k in range(0, len(start_N), 8192):
      s, e = start_N[k:k + 8192], end_N[k:k + 8192]
      lo = int(s[0]) if len(s) else pos
      f.seek(lo)
      data = f.read(int(e[-1]) - lo) if len(s) else b''
      out[k:k + len(s)] = [int.from_bytes(hashlib.blake2b(data[a - lo:b - lo], digest_size=8).digest(),
                                          'little') for a, b in zip(s.tolist(), e.tolist())]
  return out


def cache_dir(configured: str) -> str:
  for d in (configured, os.path.join(os.path.expanduser('~'), '.cache', 'mlm_jax'),
            os.path.join(tempfile.gettempdir(), 'mlm_jax_cache')):
    if not d:
      continue
    try:
      os.makedirs(d, exist_ok=True)
      if os.access(d, os.W_OK):
        return d
    except OSError:
      pass
  raise DataError(f'no writable cache directory (tried {configured!r}, ~/.cache, the temp dir)')


def load_index(path: str, unit: str, cache: str) -> dict:
  """{'start', 'end', 'hash', 'empty' (lines skipped)} for the file, from the cache when its size and mtime still match."""
  try:
    st = os.stat(path)
    with open(path, 'rb'):
      pass
  except OSError as e:
    raise DataError(f'{path}: cannot read ({e.strerror})') from None
  key = hashlib.blake2b(f'{os.path.abspath(path)}|{unit}'.encode(), digest_size=10).hexdigest()
  cache_path = os.path.join(cache, f'{os.path.basename(path)[:40]}.{key}.idx.npz')
  stamp = np.array([_VERSION, st.st_size, st.st_mtime_ns], np.int64)
  try:
    with np.load(cache_path) as z:
      if np.array_equal(z['stamp'], stamp):
        return {k: z[k] for k in ('start', 'end', 'hash', 'empty')}
  except (OSError, ValueError, KeyError):
    pass
  logging.info('Indexing %s (%s records)', path, unit)
  start, end, empty = _records(path, unit)
  index = {'start': start, 'end': end, 'hash': _hashes(path, start, end), 'empty': np.int64(empty)}
  # Write then rename, so concurrent processes never read a half-written index.
  tmp = f'{cache_path}.{os.getpid()}.tmp'
  try:
    os.makedirs(cache, exist_ok=True)
    with open(tmp, 'wb') as f:
      np.savez(f, stamp=stamp, **index)
    os.replace(tmp, cache_path)
  except OSError as e:
    logging.warning('Could not cache the index of %s in %s: %s', path, cache, e)
  return index
