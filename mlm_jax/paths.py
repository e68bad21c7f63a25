"""Paths that may be local or on an object store (gs://, through etils.epath and its fsspec backend).

Local paths keep their POSIX behaviour (rename, append, pread). An object store has no rename and
no append, but a whole-object write is atomic by itself: readers see the old object or the new one,
never a part, a kill mid-upload included. That is all `write_atomic` needs on either side.
"""
import glob as glob_lib
import json
import os

from etils import epath

_GLOB_CHARS = '*?['


def uncached_listings():
  """Object-store listings are never cached (fsspec's default caches them for the process's life):
  orbax writes checkpoint arrays through tensorstore, behind fsspec's back, so a cached listing
  would miss a step another process, or tensorstore in this one, has written since."""
  import fsspec.config  # pylint: disable=import-outside-toplevel
  for protocol in ('gs', 'gcs', 's3'):
    fsspec.config.conf.setdefault(protocol, {})['use_listings_cache'] = False


uncached_listings()


def is_local(path) -> bool:
  return '://' not in os.fspath(path)


def absolute(path: str) -> str:
  """A local path made absolute; a URL as it is (orbax and the tools need one or the other)."""
  return os.path.abspath(path) if is_local(path) else path


def write_atomic(path, data: bytes | str) -> None:
  """Writes the whole file so that a reader never sees part of it: local, a temporary file renamed
  over it; on an object store, one object upload."""
  path = os.fspath(path)
  data = data.encode('utf-8') if isinstance(data, str) else data
  if not is_local(path):
    epath.Path(path).write_bytes(data)
    return
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def write_json(path, obj) -> None:
  write_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def glob(pattern: str) -> list[str]:
  """Sorted matches of a glob pattern, local or a URL (gs://bucket/dir/*.txt; no `**` there)."""
  if is_local(pattern):
    return sorted(glob_lib.glob(pattern))
  parts = pattern.split('/')
  k = next((i for i, part in enumerate(parts) if any(c in part for c in _GLOB_CHARS)), None)
  if k is None:
    return [pattern] if epath.Path(pattern).exists() else []
  root = epath.Path('/'.join(parts[:k]))
  if not root.exists():
    return []
  return sorted(os.fspath(p) for p in root.glob('/'.join(parts[k:])))


def _fs(path):
  import fsspec  # pylint: disable=import-outside-toplevel -- epath's own backend for URLs
  return fsspec.core.url_to_fs(os.fspath(path))


def remote_version(path) -> tuple[int, int]:
  """(size, version) of a file on an object store; the version changes whenever the object is
  written (its GCS generation; else its modification time in ns: epath's stat has whole seconds)."""
  fs, key = _fs(path)
  info = fs.info(key)
  if info.get('type') == 'directory':
    raise IsADirectoryError(21, 'Is a directory', os.fspath(path))
  if str(info.get('generation', '')).isdigit():
    return int(info['size']), int(info['generation'])
  mtime = info.get('mtime') or info.get('LastModified')  # a datetime (gcsfs, s3fs)
  mtime = mtime.timestamp() if hasattr(mtime, 'timestamp') else float(mtime or 0)
  return int(info['size']), int(mtime * 1e9)


class RangeReader:
  """Byte ranges of one file: pread on a local file; on an object store, ranged GETs issued
  concurrently (one request per range, so nothing but the asked bytes is fetched)."""

  def __init__(self, path):
    self.path = os.fspath(path)
    self._fd = self._fs = None
    if is_local(self.path):
      self._fd = os.open(self.path, os.O_RDONLY)
    else:
      self._fs, self._key = _fs(self.path)

  def read(self, starts: list[int], ends: list[int]) -> list[bytes]:
    """The bytes [starts[i], ends[i]) for each i."""
    if self._fs is None:
      pread, fd = os.pread, self._fd
      return [pread(fd, e - s, s) for s, e in zip(starts, ends)]
    if not starts:
      return []
    return self._fs.cat_ranges([self._key] * len(starts), starts, ends, on_error='raise')

  def close(self):
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


def stream(path, block: int):
  """The file's bytes, `block` at a time: read() on a local file; on an object store, one ranged
  GET per block (nothing is prefetched or kept beyond the block asked for)."""
  if is_local(path):
    with open(path, 'rb') as f:
      while data := f.read(block):
        yield data
    return
  size, _ = remote_version(path)
  reader = RangeReader(path)
  for lo in range(0, size, block):
    yield reader.read([lo], [min(size, lo + block)])[0]


def makedirs(path) -> None:
  """mkdir -p, local or on an object store (where directories are only name prefixes)."""
  epath.Path(path).mkdir(parents=True, exist_ok=True)
