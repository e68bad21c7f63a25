"""Windowing and packing: every token used once, rows never overflow, segments never overlap."""
import numpy as np

from mlm_jax.data import rng, sequences


def _keys(n, epoch=0):
  return rng.record_keys(0, rng.TRAIN, np.full(n, epoch), np.arange(n))


def test_windows_cover_every_token_once_and_move_between_epochs():
  len_R = np.array([3, 10, 11, 37, 100, 8])
  rec, start, length, n_long = sequences.cut_pieces(len_R, 10, 'window', _keys(6))
  assert n_long == 3 and length.max() <= 10 and length.min() > 0
  for r, n in enumerate(len_R):
    sel = rec == r
    covered = np.concatenate([np.arange(s, s + l) for s, l in zip(start[sel], length[sel])])
    np.testing.assert_array_equal(np.sort(covered), np.arange(n))
  starts = [tuple(sequences.cut_pieces(len_R, 10, 'window', _keys(6, e))[1]) for e in range(5)]
  assert len(set(starts)) > 1  # cut points depend on the epoch


def test_truncate_keeps_the_head():
  rec, start, length, n_long = sequences.cut_pieces(np.array([5, 25]), 10, 'truncate', _keys(2))
  np.testing.assert_array_equal(rec, [0, 1])
  np.testing.assert_array_equal(start, [0, 0])
  np.testing.assert_array_equal(length, [5, 10])
  assert n_long == 1


def test_packing_fits_rows_without_overlap():
  r = np.random.default_rng(0)
  len_P = r.integers(3, 65, 500)
  row, col, num_rows = sequences.pack(len_P, 64, True)
  used = np.zeros((num_rows, 64), int)
  for p in range(len(len_P)):
    assert col[p] + len_P[p] <= 64
    used[row[p], col[p]:col[p] + len_P[p]] += 1
  assert used.max() == 1
  assert num_rows < 1.1 * len_P.sum() / 64 + 1  # greedy packing wastes little here
  # Deterministic.
  np.testing.assert_array_equal(sequences.pack(len_P, 64, True)[0], row)


def test_no_packing_gives_one_row_per_piece():
  row, col, num_rows = sequences.pack(np.array([4, 9, 2]), 16, False)
  np.testing.assert_array_equal(row, [0, 1, 2])
  np.testing.assert_array_equal(col, [0, 0, 0])
  assert num_rows == 3
