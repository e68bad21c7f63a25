"""Deterministic train/eval/test split from 64-bit hashes of each record's split key.

The split depends only on the keys and the fractions: the same on every machine, process and worker
count, and records with the same key (e.g. duplicates) always land in the same split.
"""
import numpy as np

TRAIN, EVAL, TEST = 0, 1, 2
_NAMES = {'train': TRAIN, 'eval': EVAL, 'test': TEST}


def assign(hash_N: np.ndarray, eval_fraction: float, test_fraction: float,
           strata_N: np.ndarray | None = None) -> np.ndarray:
  """Split id (TRAIN/EVAL/TEST) per record.

  Unstratified: the hash, read as a number in [0, 1), is compared with the fractions, so adding
  records never moves existing ones. Stratified: within each stratum records are ranked by hash and
  the lowest-ranked round(fraction * size) go to test, the next to eval, so every stratum gets
  its share, small ones included.
  """
  if strata_N is None:
    u_N = (hash_N >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
  else:
    order = np.lexsort((np.arange(len(hash_N)), hash_N, strata_N))
    s_sorted = strata_N[order]
    first = np.concatenate([[True], s_sorted[1:] != s_sorted[:-1]])
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    sizes = np.diff(np.concatenate([np.flatnonzero(first), [len(order)]]))
    size_sorted = np.repeat(sizes, sizes)
    u_N = np.empty(len(hash_N))
    u_N[order] = (np.arange(len(order)) - group_start + 0.5) / size_sorted
  out = np.full(len(hash_N), TRAIN, np.int8)
  out[u_N < test_fraction + eval_fraction] = EVAL
  out[u_N < test_fraction] = TEST
  return out


def select(split_N: np.ndarray, name: str) -> np.ndarray:
  """Record indices of the named split, in corpus order."""
  return np.flatnonzero(split_N == _NAMES[name]).astype(np.int64)
