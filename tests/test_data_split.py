"""Hash splits: disjoint, stable, the right fractions, stratified shares (checked by brute force)."""
import fractions
import hashlib

import numpy as np

from mlm_jax.data import split


def _hashes(keys):
  return np.array([int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), 'little')
                   for k in keys], np.uint64)


def _within_binomial(count, n, p, z=4.5):
  return abs(count - n * p) <= z * (n * p * (1 - p)) ** 0.5


def test_fractions_and_disjointness():
  n = 20000
  h = _hashes([f'k{i}' for i in range(n)])
  s = split.assign(h, 0.1, 0.05)
  ids = [set(split.select(s, name).tolist()) for name in ('train', 'eval', 'test')]
  assert sum(map(len, ids)) == n and len(set().union(*ids)) == n
  # Hashes are uniform, so the split sizes are binomial.
  assert _within_binomial(len(ids[1]), n, 0.1) and _within_binomial(len(ids[2]), n, 0.05)
  # The documented rule, by brute force: the hash read as a number in [0, 1) against the
  # fractions. In hash order the splits come as one run of test, then eval, then train, and the
  # cuts sit at 0.05 and 0.15 of the 64-bit range.
  order = sorted(range(n), key=lambda i: int(h[i]))
  names = [int(s[i]) for i in order]
  runs = [names[0]] + [b for a, b in zip(names, names[1:]) if a != b]
  assert runs == [split.TEST, split.EVAL, split.TRAIN]
  top = 2**64
  last_test = max(int(h[i]) for i in ids[2])
  first_eval, last_eval = min(int(h[i]) for i in ids[1]), max(int(h[i]) for i in ids[1])
  first_train = min(int(h[i]) for i in ids[0])
  assert last_test < 0.05 * top <= first_eval and last_eval < 0.15 * top <= first_train


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


def test_stratified_split_hand_worked():
  """Strata of 7, 3, 1 and 12 records, eval 0.2, test 0.1. Per stratum (documented rule): the
  round(0.1 * size) lowest hashes go to test, the next round(0.3 * size) - that to eval:
    7: test round(0.7) = 1, test+eval round(2.1) = 2 -> eval 1
    3: test round(0.3) = 0, test+eval round(0.9) = 1 -> eval 1
    1: test 0, test+eval round(0.3) = 0 -> eval 0
   12: test round(1.2) = 1, test+eval round(3.6) = 4 -> eval 3"""
  sizes = {0: 7, 1: 3, 2: 1, 3: 12}
  want = {0: (1, 1), 1: (0, 1), 2: (0, 0), 3: (1, 3)}  # stratum -> (test, eval)
  strata = np.array([g for g, size in sizes.items() for _ in range(size)])
  strata = strata[np.random.default_rng(0).permutation(len(strata))]  # interleaved in the corpus
  h = _hashes([f'rec{i}' for i in range(len(strata))])
  s = split.assign(h, 0.2, 0.1, strata)
  for g, (n_test, n_eval) in want.items():
    members = sorted(np.flatnonzero(strata == g).tolist(), key=lambda i: int(h[i]))
    got = [int(s[i]) for i in members]
    assert got == [split.TEST] * n_test + [split.EVAL] * n_eval + [split.TRAIN] * (
        sizes[g] - n_test - n_eval), g


def test_stratified_split_gives_every_stratum_its_share_by_brute_force():
  r = np.random.default_rng(1)
  sizes = r.integers(1, 60, 80)
  ev, te = fractions.Fraction(21, 100), fractions.Fraction(13, 100)
  # round() is unambiguous here: no size puts a share exactly on a half.
  sizes = [int(n) for n in sizes if (te * int(n)).denominator != 2 and (
      (te + ev) * int(n)).denominator != 2]
  strata = np.repeat(np.arange(len(sizes)), sizes)
  h = _hashes([f'x{i}' for i in range(len(strata))])
  s = split.assign(h, float(ev), float(te), strata)
  for g, size in enumerate(sizes):
    members = sorted(np.flatnonzero(strata == g).tolist(), key=lambda i: int(h[i]))
    n_test = round(te * size)
    n_eval = round((te + ev) * size) - n_test
    assert [int(s[i]) for i in members] == (
        [split.TEST] * n_test + [split.EVAL] * n_eval + [split.TRAIN] * (size - n_test - n_eval))
  # Deterministic and independent of record order.
  perm = np.random.default_rng(0).permutation(len(h))
  np.testing.assert_array_equal(split.assign(h[perm], float(ev), float(te), strata[perm]), s[perm])
