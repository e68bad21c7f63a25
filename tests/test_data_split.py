"""Hash splits: disjoint, stable, the right fractions, stratified shares."""
import hashlib

import numpy as np

from mlm_jax.data import split


def _hashes(keys):
  return np.array([int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), 'little')
                   for k in keys], np.uint64)


def test_fractions_and_disjointness():
  h = _hashes([f'k{i}' for i in range(20000)])
  s = split.assign(h, 0.1, 0.05)
  ids = [set(split.select(s, n).tolist()) for n in ('train', 'eval', 'test')]
  assert sum(map(len, ids)) == 20000 and len(set().union(*ids)) == 20000
  assert abs(len(ids[1]) / 20000 - 0.1) < 0.01 and abs(len(ids[2]) / 20000 - 0.05) < 0.008


def test_assignment_depends_only_on_the_key():
  keys = [f'k{i}' for i in range(5000)]
  s = split.assign(_hashes(keys), 0.2, 0.0)
  # Adding records and shuffling the corpus never moves an existing key.
  more = keys[::-1] + [f'new{i}' for i in range(3000)]
  s2 = split.assign(_hashes(more), 0.2, 0.0)
  np.testing.assert_array_equal(s2[:5000][::-1], s)
  # Duplicated keys share a split.
  dup = split.assign(_hashes(['same'] * 10 + keys[:10]), 0.5, 0.0)
  assert len(set(dup[:10].tolist())) == 1


def test_stratified_split_gives_every_stratum_its_share():
  strata = np.repeat(np.arange(4), [1000, 100, 20, 10])
  h = _hashes([f'k{i}' for i in range(len(strata))])
  s = split.assign(h, 0.2, 0.1, strata)
  for g, size in enumerate([1000, 100, 20, 10]):
    in_g = s[strata == g]
    assert (in_g == split.EVAL).sum() == round(0.2 * size)
    assert (in_g == split.TEST).sum() == round(0.1 * size)
  # Deterministic and independent of record order.
  perm = np.random.default_rng(0).permutation(len(h))
  np.testing.assert_array_equal(split.assign(h[perm], 0.2, 0.1, strata[perm]), s[perm])
