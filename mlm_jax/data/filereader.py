"""Reads records of indexed text files by number: a chunk at a time, straight into numpy."""
import numpy as np

from mlm_jax import paths
from mlm_jax.data import textindex


class FileSet:
  """Records of several indexed files, numbered consecutively across files.

  A chunk's records are read with one pread per run of nearby records (gaps under _MAX_GAP are
  read through), so small corpora cost a few syscalls per chunk and large ones one per record.
  The bytes land in the page cache, never in this process's memory (unlike an mmap, whose pages
  count towards RSS), so resident memory does not grow with the corpus. A file on an object store
  (gs://) is read the same way, one ranged GET per run, all of a chunk's runs at once; a request
  costs far more than a syscall there, so longer gaps are read through.
  """

  _MAX_GAP = 4096
  _MAX_GAP_REMOTE = 1 << 18

  def __init__(self, files, unit, cache, limit):
    self.files, self.unit, self.cache = files, unit, cache
    self._indexes = [self._index(p) for p in files]
    counts = [len(ix['start']) for ix in self._indexes]
    self.bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    self.empty_lines = sum(int(ix['empty']) for ix in self._indexes)
    self.n = int(self.bounds[-1]) if not limit else min(limit, int(self.bounds[-1]))
    self._max_gap = (self._MAX_GAP if all(paths.is_local(p) for p in files)
                     else self._MAX_GAP_REMOTE)
    self._readers = None

  def __getstate__(self):  # workers reload indexes from the cache and open the files themselves
    return {k: v for k, v in self.__dict__.items() if k not in ('_indexes', '_readers')}

  def __setstate__(self, state):
    self.__dict__.update(state, _indexes=None, _readers=None)

  def _index(self, path):
    return textindex.load_index(path, self.unit, self.cache)

  def _load(self):
    if self._indexes is None:
      self._indexes = [self._index(p) for p in self.files]
    if self._readers is None:
      self._readers = [paths.RangeReader(p) for p in self.files]

  def locate(self, ids_N):
    f_N = np.searchsorted(self.bounds, ids_N, side='right') - 1
    return f_N, ids_N - self.bounds[f_N]

  def read_flat(self, ids_N) -> tuple[np.ndarray, np.ndarray]:
    """The records' bytes concatenated (uint8) and their lengths."""
    self._load()
    f_N, local_N = self.locate(np.asarray(ids_N, np.int64))
    start_N, len_N = np.zeros(len(f_N), np.int64), np.zeros(len(f_N), np.int64)
    for f in np.unique(f_N).tolist():
      sel = f_N == f
      start_N[sel] = self._indexes[f]['start'][local_N[sel]]
      len_N[sel] = self._indexes[f]['length'][local_N[sel]]
    # Runs of nearby records (per file, in file order), each read with one pread.
    order = np.lexsort((start_N, f_N))
    f_s, s_s = f_N[order], start_N[order]
    e_s = s_s + len_N[order]
    # Records never overlap (a repeated one is identical), so ends ascend with starts in a file.
    new_run = np.ones(len(f_s), bool)
    new_run[1:] = (f_s[1:] != f_s[:-1]) | (s_s[1:] > e_s[:-1] + self._max_gap)
    run = np.cumsum(new_run) - 1
    first = np.flatnonzero(new_run)
    run_lo = s_s[first]
    run_hi = np.maximum.reduceat(e_s, first) if len(first) else e_s
    run_f = f_s[first]
    if len(first) and run_f[0] == run_f[-1]:  # one file (runs are in file order): one call
      data = b''.join(self._readers[int(run_f[0])].read(run_lo.tolist(), run_hi.tolist()))
    else:
      pieces = [b''] * len(first)
      for f in np.unique(run_f).tolist():
        k = np.flatnonzero(run_f == f)
        for j, b in zip(k.tolist(), self._readers[f].read(run_lo[k].tolist(), run_hi[k].tolist())):
          pieces[j] = b
      data = b''.join(pieces)
    run_off = np.cumsum(run_hi - run_lo) - (run_hi - run_lo)
    pos_s = run_off[run] + (s_s - run_lo[run])  # where each record starts in `data`
    pos_N = np.empty(len(f_N), np.int64)
    pos_N[order] = pos_s
    dest_N = np.cumsum(len_N) - len_N
    src = np.repeat(pos_N - dest_N, len_N) + np.arange(int(len_N.sum()))
    return np.frombuffer(data, np.uint8)[src], len_N

  def read(self, ids_N) -> list[bytes]:
    flat, len_N = self.read_flat(ids_N)
    data, ends = flat.tobytes(), np.cumsum(len_N).tolist()
    return [data[e - n:e] for e, n in zip(ends, len_N.tolist())]

  def hashes(self):
    return np.concatenate([textindex.load_hashes(p, self.unit, self.cache)
                           for p in self.files])[:self.n]

  def where(self, i) -> str:
    """'file:line' of record i, for error messages (counts newlines, so only on the error path)."""
    self._load()
    f, local = (int(x[0]) for x in self.locate(np.array([i])))
    start = int(self._indexes[f]['start'][local])
    line = self._readers[f].read([0], [start])[0].count(b'\n') + 1
    return f'{self.files[f]}:{line}'
