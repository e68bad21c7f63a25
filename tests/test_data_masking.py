"""Masking: exact counts, 15% and 80/10/10 statistics, whole words, specials never touched."""
import types

import numpy as np
import pytest

from mlm_jax.data import masking, rng

V, MASK_ID = 1000, 4
SPECIAL = np.arange(5)


def _tok():
  normal = np.arange(5, V, dtype=np.int32)
  return types.SimpleNamespace(mask_id=MASK_ID, normal_ids=normal)


def _cfg(mode='exact', whole_word=False, rate=0.15):
  return types.SimpleNamespace(mask_rate=rate, mask_mode=mode, mask_token_frac=0.8,
                               random_token_frac=0.1, whole_word_mask=whole_word)


def _pieces(num, seed=0, max_len=80):
  """Flat pieces: [CLS]=2 content [SEP]=3 with a few [UNK]=1 inside the content."""
  r = np.random.default_rng(seed)
  len_P = r.integers(1, max_len, num)
  piece_T = np.repeat(np.arange(num), len_P + 2)
  j_T = np.arange(len(piece_T)) - np.repeat(np.cumsum(len_P + 2) - len_P - 2, len_P + 2)
  ids_T = r.integers(5, V, len(piece_T)).astype(np.int32)
  ids_T[r.random(len(ids_T)) < 0.02] = 1  # [UNK]
  ids_T[j_T == 0] = 2
  ids_T[j_T == len_P[piece_T] + 1] = 3
  maskable_T = ~np.isin(ids_T, SPECIAL)
  keys_P = rng.record_keys(7, rng.TRAIN, np.zeros(num, np.int64), np.arange(num))
  return ids_T, maskable_T, piece_T, keys_P, j_T


def _run(cfg, num=4000, seed=0, word_start_T=None):
  ids_T, maskable_T, piece_T, keys_P, j_T = _pieces(num, seed)
  out, chosen = masking.mask_pieces(ids_T, maskable_T, piece_T, keys_P, j_T,
                                    np.zeros(num, np.int64), word_start_T, _tok(), cfg)
  return ids_T, maskable_T, piece_T, out, chosen


def test_exact_mode_chooses_round_rate_n_per_piece_and_never_specials():
  ids, maskable, piece, out, chosen = _run(_cfg())
  n_P = np.bincount(piece[maskable], minlength=4000)
  want = np.where(n_P > 0, np.maximum(1, np.floor(0.15 * n_P + 0.5)), 0)
  np.testing.assert_array_equal(np.bincount(piece[chosen], minlength=4000), want)
  assert not chosen[~maskable].any()
  np.testing.assert_array_equal(out[~chosen], ids[~chosen])  # nothing else changes


def test_exact_mode_80_10_10_counts_per_piece_and_overall():
  ids, maskable, piece, out, chosen = _run(_cfg(), num=20000)
  is_mask = chosen & (out == MASK_ID)
  is_keep = chosen & (out == ids)
  is_random = chosen & ~is_mask & ~is_keep
  m_P = np.bincount(piece[chosen], minlength=20000)
  # Per piece the counts are the expected ones rounded up or down.
  mask_P = np.bincount(piece[is_mask], minlength=20000)
  assert np.all(np.abs(mask_P - 0.8 * m_P) < 1)
  # A random replacement equal to the original (p = 1/995) reads as a keep: allow one more.
  random_P = np.bincount(piece[is_random], minlength=20000)
  assert np.all(np.abs(random_P - 0.1 * m_P) < 2)
  assert np.mean(np.abs(random_P - 0.1 * m_P) >= 1) < 0.01
  total = chosen.sum()
  assert abs(is_mask.sum() / total - 0.8) < 0.01
  assert abs(is_random.sum() / total - 0.1) < 0.01
  assert abs(is_keep.sum() / total - 0.1) < 0.01
  # Random replacements come from the non-special vocabulary.
  assert not np.isin(out[is_random], SPECIAL).any()


def test_bernoulli_mode_rates():
  ids, maskable, piece, out, chosen = _run(_cfg('bernoulli'), num=20000)
  assert abs(chosen.sum() / maskable.sum() - 0.15) < 0.004
  assert not chosen[~maskable].any()
  assert abs((out[chosen] == MASK_ID).mean() - 0.8) < 0.01
  assert abs((out[chosen] == ids[chosen]).mean() - 0.1) < 0.01


def test_masks_are_a_pure_function_of_the_keys():
  a = _run(_cfg(), seed=3)
  b = _run(_cfg(), seed=3)
  np.testing.assert_array_equal(a[3], b[3])
  c = _run(_cfg(), num=4000, seed=4)
  assert not np.array_equal(a[4][:1000], c[4][:1000])


@pytest.mark.parametrize('mode', ['exact', 'bernoulli'])
def test_whole_word_masking_takes_whole_words(mode):
  ids, maskable, piece, _, _ = _run(_cfg())
  r = np.random.default_rng(1)
  word_start = r.random(len(ids)) < 0.4
  _, _, _, out, chosen = _run(_cfg(mode, whole_word=True), word_start_T=word_start)
  prev_maskable = np.concatenate([[False], maskable[:-1]])
  prev_piece = np.concatenate([[-1], piece[:-1]])
  starts = maskable & (word_start | ~prev_maskable | (prev_piece != piece))
  word = np.cumsum(starts) - 1
  w = word[maskable]
  chosen_w = chosen[maskable]
  # Every word is either fully chosen or not at all.
  per_word = np.bincount(w, weights=chosen_w) / np.bincount(w)
  assert set(np.unique(per_word)) <= {0.0, 1.0}
  assert not chosen[~maskable].any()
  rate = chosen.sum() / maskable.sum()
  assert 0.13 < rate < 0.22  # whole words overshoot the target a little in exact mode
