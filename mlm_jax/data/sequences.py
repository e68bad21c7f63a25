"""Sequence building: long records cut into pieces, pieces packed into rows of max_len tokens.

Everything works on a chunk of records at once: token ids arrive concatenated (`tok_N`) with
per-record lengths, so the work is a handful of numpy ops rather than a loop over tokens.
"""
import numpy as np

from mlm_jax.data import rng


def cut_pieces(len_R: np.ndarray, max_tokens: int, mode: str, keys_R: np.ndarray):
  """Cuts records into pieces of at most max_tokens tokens.

  'window': a long record is cut at offset o, o + max_tokens, ... with o drawn per (record, epoch),
  so every token is used and the cut points move between epochs. 'truncate': keep the first
  max_tokens. Returns (record_P, start_P, len_P) and the number of records cut.
  """
  long_R = len_R > max_tokens
  if mode == 'truncate' or not long_R.any():
    return np.arange(len(len_R)), np.zeros(len(len_R), np.int64), np.minimum(len_R, max_tokens), int(
        long_R.sum())
  offset_R = np.where(long_R, (rng.uniform(keys_R, 0, rng.WINDOW) * max_tokens).astype(np.int64), 0)
  head_R = (offset_R > 0).astype(np.int64)  # a short first piece before the first cut
  count_R = head_R + -(-(len_R - offset_R) // max_tokens)
  record_P = np.repeat(np.arange(len(len_R)), count_R)
  k_P = np.arange(len(record_P)) - np.repeat(np.cumsum(count_R) - count_R, count_R) - head_R[record_P]
  o_P = offset_R[record_P]
  start_P = np.where(k_P < 0, 0, o_P + k_P * max_tokens)
  end_P = np.where(k_P < 0, o_P, np.minimum(o_P + (k_P + 1) * max_tokens, len_R[record_P]))
  return record_P, start_P, end_P - start_P, int(long_R.sum())


def pack(len_P: np.ndarray, max_len: int, packing: bool):
  """Assigns pieces (lengths including [CLS]/[SEP]) to rows: (row_P, column_P, num_rows).

  Greedy and deterministic: the longest remaining piece opens a row, then the shortest remaining
  pieces top it up while they fit. O(pieces), and close to first-fit-decreasing on real lengths.
  """
  n = len(len_P)
  if not packing:
    return np.arange(n), np.zeros(n, np.int64), n
  order = np.argsort(-len_P, kind='stable')
  lens = len_P[order].tolist()
  rows, cols = [0] * n, [0] * n  # in sorted order
  i, j, row = 0, n - 1, 0
  while i <= j:
    used = lens[i]
    rows[i] = row
    i += 1
    while j >= i and used + lens[j] <= max_len:
      rows[j], cols[j] = row, used
      used += lens[j]
      j -= 1
    row += 1
  row_P, col_P = np.empty(n, np.int64), np.empty(n, np.int64)
  row_P[order], col_P[order] = rows, cols
  return row_P, col_P, row


def layout(start_P, len_P):
  """Per content token (specials excluded) of non-empty pieces, in piece order: piece_C, j_C
  (its position in the piece, 1-based since [CLS] is 0) and offset_C (offset in its record)."""
  first_P = np.cumsum(len_P) - len_P
  total = int(first_P[-1] + len_P[-1]) if len(len_P) else 0
  # Pieces are never empty, so marking piece starts and a cumsum gives piece_C (cheaper than repeat).
  starts = np.zeros(total, np.int32)
  starts[first_P[1:]] = 1
  piece_C = np.cumsum(starts, dtype=np.int32)
  ar = np.arange(total)
  j_C = ar - (first_P - 1)[piece_C]
  offset_C = ar + (start_P - first_P)[piece_C]
  return piece_C, j_C, offset_C
