"""Byte-offset index of the records in a text file, built once with numpy and cached on disk.

A record is a non-empty line ('line') or a run of non-empty lines ('block'), with surrounding
whitespace trimmed. The index holds start offsets and lengths (12 bytes a record); blake2b hashes
of the records (the default split key) are a second cached file, built only when a split is carved.
The corpus itself is never held in memory.
"""
import hashlib
import io
import os
import tempfile

import numpy as np
from absl import logging
from etils import epath

from mlm_jax import paths
from mlm_jax.errors import DataError

_VERSION = 3
_BLOCK = 16 << 20
_WS = np.zeros(256, bool)
_WS[[9, 10, 11, 12, 13, 32]] = True


def _line_spans(buf: np.ndarray, base: int):
  """Per line of `buf` (which ends with a newline): whitespace-trimmed [first, end) offsets.

  Trimming steps all lines with leading (trailing) whitespace one byte at a time, so memory stays
  O(lines) and the loop runs as often as the longest whitespace run.
  """
  end = np.flatnonzero(buf == 10)
  first = np.concatenate([[0], end[:-1] + 1])
  todo = np.flatnonzero(_WS[buf[np.minimum(first, end)]] & (first < end))
  while len(todo):
    first[todo] += 1
    todo = todo[(first[todo] < end[todo]) & _WS[buf[first[todo]]]]
  todo = np.flatnonzero(first < end)
  todo = todo[_WS[buf[end[todo] - 1]]]
  while len(todo):
    end[todo] -= 1
    todo = todo[(end[todo] > first[todo]) & _WS[buf[end[todo] - 1]]]
  first = np.minimum(first, end)
  return first + base, end + base


def _blocks(path):
  """Yields (uint8 array ending with a newline, absolute offset of its first byte); the file is
  streamed _BLOCK bytes at a time (on an object store, ranged reads: never downloaded whole)."""
  offset, carry = 0, b''
  for data in paths.stream(path, _BLOCK):
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
  reader = paths.RangeReader(path)
  try:
    for k in range(0, len(start_N), 8192):
      s, e = start_N[k:k + 8192], end_N[k:k + 8192]
      lo = int(s[0])
      data = reader.read([lo], [int(e[-1])])[0]
      out[k:k + len(s)] = [int.from_bytes(hashlib.blake2b(data[a - lo:b - lo], digest_size=8).digest(),
                                          'little') for a, b in zip(s.tolist(), e.tolist())]
  finally:
    reader.close()
  return out


DATA_DIR = '{data}'  # in data.cache_dir: the directory of each data file


def cache_dir(configured: str) -> str:
  """Where indexes go: `configured` (local or a URL such as gs://bucket/run/index_cache; with
  `{data}`, per data file, see `file_cache_dir`), else ~/.cache/mlm_jax, else the temp dir."""
  if DATA_DIR in configured or not paths.is_local(configured):
    return configured  # created when the first index is written
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


def file_cache_dir(cache: str, path: str) -> str:
  """The cache directory of data file `path`: `cache` with `{data}` standing for the file's own
  directory (so gs://bucket/corpus/*.txt with '{data}/.mlm_jax_index' keeps the indexes in the
  bucket, beside the data, for every machine that reads it)."""
  return cache.replace(DATA_DIR, os.path.dirname(path.rstrip('/'))) if DATA_DIR in cache else cache


def _stamp(path) -> np.ndarray:
  """(version, size, mtime) of a data file: a cached index is valid while they are unchanged."""
  try:
    if paths.is_local(path):
      st = os.stat(path)
      with open(path, 'rb'):
        pass
      size, mtime_ns = st.st_size, st.st_mtime_ns
    else:
      size, mtime_ns = paths.remote_version(path)
  except OSError as e:
    raise DataError(f'{path}: cannot read ({e.strerror or e})') from None
  return np.array([_VERSION, size, mtime_ns], np.int64)


def _load_cached(cache_path: str, stamp) -> dict | None:
  try:
    source = cache_path if paths.is_local(cache_path) else io.BytesIO(
        epath.Path(cache_path).read_bytes())
    with np.load(source) as z:
      if np.array_equal(z['stamp'], stamp):
        return {k: z[k] for k in z.files if k != 'stamp'}
  except (OSError, ValueError, KeyError):
    pass
  return None


def _store_cached(cache: str, cache_path: str, kind: str, path: str, stamp, arrays: dict):
  # Written whole (temporary file and rename; one upload on an object store), so concurrent
  # processes never read a half-written file.
  try:
    epath.Path(cache).mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, stamp=stamp, **arrays)
    paths.write_atomic(cache_path, buf.getvalue())
  except OSError as e:
    logging.warning('Could not cache the %s of %s in %s: %s', kind, path, cache, e)


def _cached(path, unit, cache, kind, build):
  """Arrays `build()` returns, cached on disk under a key of (path, unit, kind, size, mtime)."""
  stamp = _stamp(path)
  cache = file_cache_dir(cache, path)
  key = hashlib.blake2b(f'{paths.absolute(path)}|{unit}'.encode(), digest_size=10).hexdigest()
  cache_path = os.path.join(cache, f'{os.path.basename(path)[:40]}.{key}.{kind}.npz')
  arrays = _load_cached(cache_path, stamp)
  if arrays is None:
    arrays = build()
    _store_cached(cache, cache_path, kind, path, stamp, arrays)
  return arrays


def load_index(path: str, unit: str, cache: str) -> dict:
  """{'start' (int64), 'length' (int32), 'empty' (lines skipped)} of the file's records, cached."""

  def build():
    logging.info('Indexing %s (one record per %s)', path, unit)
    start, end, empty = _records(path, unit)
    if len(start) and (end - start).max() >= 2**31:
      raise DataError(f'{path}: a record of 2 GB or more (is text_unit right?)')
    return {'start': start, 'length': (end - start).astype(np.int32), 'empty': np.int64(empty)}

  return _cached(path, unit, cache, 'idx', build)


def load_hashes(path: str, unit: str, cache: str) -> np.ndarray:
  """blake2b (64-bit) of every record's bytes: the default split key. Cached; built on demand."""
  index = load_index(path, unit, cache)
  return _cached(path, unit, cache, 'hash',
                 lambda: {'hash': _hashes(path, index['start'],
                                          index['start'] + index['length'])})['hash']
