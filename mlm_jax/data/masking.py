"""BERT masking of a chunk's pieces, vectorized, with randomness from per-record counter hashes.

Pieces (records or windows of records) are the unit: in 'exact' mode each piece with n maskable
tokens gets exactly max(1, round(rate * n)) chosen tokens (whole-word mode: whole words until that
count is reached). The chosen tokens become [MASK], a random non-special token or stay unchanged,
in proportions (mask_frac, random_frac, rest): per piece the counts are the expected counts rounded
up or down at random (exact when they are whole numbers, unbiased always).
"""
import numpy as np

from mlm_jax.data import rng

MASK, RANDOM, KEEP = 0, 1, 2


def _rank_in_group(group_T, key_T, num_groups):
  """Rank of each element by key (in [0, 2]) within its group (ints >= 0, in any order)."""
  n = len(group_T)
  if n < (1 << 20) and num_groups < (1 << 20):
    # Sorting one packed uint64 (group | key quantized to 22 bits | index) beats an argsort.
    q = (key_T * (1 << 22)).astype(np.uint64)
    packed = (group_T.astype(np.uint64) << np.uint64(44)) | (q << np.uint64(20)) | np.arange(
        n, dtype=np.uint64)
    packed.sort()
    order = (packed & np.uint64(0xFFFFF)).astype(np.int64)
  else:
    order = np.argsort(group_T * 4.0 + key_T, kind='stable')
  sorted_group = group_T[order]
  first_G = np.searchsorted(sorted_group, np.arange(num_groups))
  rank = np.empty(n, np.int64)
  rank[order] = np.arange(n) - first_G[sorted_group]
  return rank


def _exact_tokens(maskable_T, piece_T, num_pieces, u_T, rate):
  """The k = max(1, round(rate * n)) maskable tokens with the smallest u in each piece.

  Only candidates below a per-piece threshold (k/n plus a few standard deviations) are sorted;
  a piece with too few candidates (rare) falls back to all its tokens, so the result is exact.
  """
  n_P = np.bincount(piece_T, minlength=num_pieces)
  if not maskable_T.all():
    n_P = n_P - np.bincount(piece_T[~maskable_T], minlength=num_pieces)
  k_P = np.where(n_P > 0, np.maximum(1, np.floor(rate * n_P + 0.5)), 0)
  t_P = ((k_P + 2 * np.sqrt(k_P) + 2) / np.maximum(n_P, 1)).astype(u_T.dtype)
  if not maskable_T.all():
    u_T = np.where(maskable_T, u_T, u_T.dtype.type(2))
  cand = np.flatnonzero(u_T < t_P[piece_T])
  short = np.bincount(piece_T[cand], minlength=num_pieces) < k_P
  if short.any():
    t_P[short] = 3
    cand = np.flatnonzero(u_T < t_P[piece_T])
  piece_c = piece_T[cand]
  rank = _rank_in_group(piece_c, u_T[cand], num_pieces)
  chosen = np.zeros(len(piece_T), bool)
  chosen[cand[rank < k_P[piece_c]]] = True
  return chosen


def choose(maskable_T, piece_T, num_pieces, u_T, word_start_T, rate, mode, whole_word):
  """Boolean mask of the tokens chosen for prediction."""
  if not whole_word:
    if mode == 'bernoulli':
      return maskable_T & (u_T < rate)
    return _exact_tokens(maskable_T, piece_T, num_pieces, u_T, rate)
  # Words: maximal runs of maskable tokens that start at a word start.
  prev_maskable = np.concatenate([[False], maskable_T[:-1]])
  prev_piece = np.concatenate([[-1], piece_T[:-1]])
  starts_T = maskable_T & (word_start_T | ~prev_maskable | (prev_piece != piece_T))
  word_T = np.cumsum(starts_T) - 1
  first_W = np.flatnonzero(starts_T)
  if not len(first_W):
    return np.zeros_like(maskable_T)
  size_W = np.bincount(word_T[maskable_T], minlength=len(first_W))
  piece_W, u_W = piece_T[first_W], u_T[first_W]
  if mode == 'bernoulli':
    chosen_W = u_W < rate
  else:
    n_P = np.bincount(piece_W, weights=size_W, minlength=num_pieces)
    k_P = np.where(n_P > 0, np.maximum(1, np.floor(rate * n_P + 0.5)), 0)
    order = np.argsort(piece_W * 4.0 + u_W, kind='stable')
    cum = np.cumsum(size_W[order])
    before = cum - size_W[order]  # tokens of earlier words, counted from the chunk start
    piece_sorted = piece_W[order]
    first = np.searchsorted(piece_sorted, np.arange(num_pieces))
    base_P = np.where(first < len(order), before[np.minimum(first, len(order) - 1)], 0)
    chosen_W = np.empty(len(first_W), bool)
    chosen_W[order] = (before - base_P[piece_sorted]) < k_P[piece_sorted]
  return maskable_T & chosen_W[np.maximum(word_T, 0)]


def categories(piece_M, num_pieces, v_M, w_P, mask_frac, random_frac, mode):
  """MASK / RANDOM / KEEP for each chosen token (the M chosen ones, in piece order)."""
  if mode == 'bernoulli':
    return np.where(v_M < mask_frac, MASK, np.where(v_M < mask_frac + random_frac, RANDOM, KEEP))
  m_P = np.bincount(piece_M, minlength=num_pieces)
  n_mask_P = np.floor(mask_frac * m_P + w_P)
  n_mask_random_P = np.floor((mask_frac + random_frac) * m_P + w_P)
  rank = _rank_in_group(piece_M, v_M, num_pieces)
  return np.where(rank < n_mask_P[piece_M], MASK,
                  np.where(rank < n_mask_random_P[piece_M], RANDOM, KEEP))


def mask_pieces(ids_C, maskable_C, piece_C, keys_P, offset_C, start_P, word_start_C, tokenizer, d):
  """Chooses and replaces tokens of the pieces (flat content tokens, in piece order).
  Returns (masked ids_C, chosen_C).

  Random numbers per token are drawn from (record key, token offset in the record), so a token
  gets the same ones however its record was windowed or packed.
  """
  num_pieces = len(keys_P)
  u_C = rng.uniform32(rng.fold32(keys_P)[piece_C], offset_C, rng.SELECT)
  chosen = choose(maskable_C, piece_C, num_pieces, u_C, word_start_C, d.mask_rate, d.mask_mode,
                  d.whole_word_mask)
  idx_M = np.flatnonzero(chosen)  # only the chosen tokens need more random numbers
  piece_M, offset_M = piece_C[idx_M], offset_C[idx_M]
  keys_M = keys_P[piece_M]
  v_M = rng.uniform(keys_M, offset_M, rng.CATEGORY)
  w_P = rng.uniform(keys_P, start_P, rng.ROUNDING) if d.mask_mode == 'exact' else None
  cat_M = categories(piece_M, num_pieces, v_M, w_P, d.mask_token_frac, d.random_token_frac,
                     d.mask_mode)
  out = ids_C.copy()
  out[idx_M[cat_M == MASK]] = tokenizer.mask_id
  rand = cat_M == RANDOM
  if rand.any():
    normal = tokenizer.normal_ids
    r = rng.uniform(keys_M[rand], offset_M[rand], rng.REPLACE)
    out[idx_M[rand]] = normal[np.minimum((r * len(normal)).astype(np.int64), len(normal) - 1)]
  return out, chosen
