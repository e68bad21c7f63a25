"""One unit of pipeline work: a chunk of records -> rows of the batch layout (masked, packed).

Rows come out in a compact wire format (narrow dtypes, no token_type_ids); `widen` turns a batch
of them into the batch contract.

`ChunkBuilder` is picklable and holds no open resources, so grain can ship it to worker processes.
Its output is a pure function of (records, epochs, seed, stream): the same on every worker count.
"""
import collections

import numpy as np

from mlm_jax.data import masking, rng, sequences, sources, stats
from mlm_jax.errors import DataError


class ChunkBuilder:
  """Reads, tokenizes, cuts, packs and masks a chunk of records into rows."""

  def __init__(self, config, tokenizer, source, seed, stream, max_predictions):
    d = config.data
    if hasattr(source, 'with_tokenizer'):  # sources whose features depend on the tokenizer's vocab
      source = source.with_tokenizer(tokenizer)
    self.source, self.tokenizer = source, tokenizer
    self.seed, self.stream = int(seed), stream
    self.max_len, self.num_predictions = config.model.max_len, max_predictions
    self.features = dict(config.model.extra_embeddings)
    self.d = _Frozen({k: d[k] for k in ('long_records', 'packing', 'mask_rate', 'mask_mode',
                                        'mask_token_frac', 'random_token_frac', 'whole_word_mask',
                                        'invalid_utf8', 'bad_records')})
    self._special_V = np.zeros(tokenizer.vocab_size, bool)
    self._special_V[tokenizer.special_ids] = True
    self._ascii_fast = isinstance(source, sources.TextSource) and hasattr(tokenizer, 'encode_ascii')
    # Rows travel from workers in the narrowest dtypes that fit (less to copy); widen() restores
    # the batch contract in the training process.
    self._id_dtype = _narrow(tokenizer.vocab_size)
    self._pos_dtype = _narrow(self.max_len)

  def __call__(self, record_N: np.ndarray, epoch_N: np.ndarray) -> dict:
    """Rows of the records record_N (read in epochs epoch_N), plus '_stats' (the chunk's
    stats.CHUNK_COUNTERS) and '_bad' (its first SHOW_BAD bad records as (record id, why))."""
    counts = collections.Counter(records=len(record_N))
    tok_N, len_R, feats, keep, good_R, bad = self._tokenize(record_N, counts)
    if bad and self.d.bad_records == 'error':
      k, why = bad[0]
      raise DataError(f'{self.source.where(int(record_N[k]))}: {why} (data.bad_records=error; '
                      "'skip' drops such records)")
    counts['bad_records'] = len(bad)
    bad = [(int(record_N[k]), why) for k, why in bad[:stats.SHOW_BAD]]
    record_N, epoch_N = record_N[keep], epoch_N[keep]
    counts['unk_tokens'] = int(np.count_nonzero(tok_N == self.tokenizer.unk_id))
    counts['empty_records'] = int(np.count_nonzero(len_R == 0))
    nonempty = (len_R > 0) & good_R
    keys_R = rng.record_keys(self.seed, self.stream, epoch_N, record_N)
    offset_R = np.cumsum(len_R) - len_R
    live = np.flatnonzero(nonempty)
    record_P, start_P, len_P, n_long = sequences.cut_pieces(
        len_R[live], self.max_len - 2, self.d.long_records, keys_R[live])
    record_P = live[record_P]
    counts['long_records'] = n_long
    counts['pieces'] = len(record_P)
    row_P, col_P, num_rows = sequences.pack(len_P + 2, self.max_len, self.d.packing)
    rows = self._rows(tok_N, offset_R, keys_R, feats, record_P, start_P, len_P, row_P, col_P,
                      num_rows, counts)
    # Chunk-level entries (popped before rows are cut into batches): they come even with no rows.
    rows['_stats'] = stats.chunk_vector(counts)
    rows['_bad'] = bad
    return rows

  def _tokenize(self, record_N, counts):
    """(tok_N, len_R, features, kept positions, good_R, bad) for the records that survive
    reading. good_R is False where a kept record turns out bad (a feature that does not fit, a
    token id outside the vocabulary); bad lists every bad record as (position in record_N, why),
    in that order."""
    if self._ascii_fast:
      flat, len_R = self.source.read_flat(record_N)
      if not len(flat) or (flat.max() < 128 and flat.min() > 0):  # ASCII without NUL
        ok = np.ones(len(len_R), bool)
        return self.tokenizer.encode_ascii(flat), len_R, {}, np.arange(len(len_R)), ok, []
      data, ends = flat.tobytes(), np.cumsum(len_R).tolist()
      recs = sources.decode([data[e - n:e] for e, n in zip(ends, len_R.tolist())],
                            self.d.invalid_utf8, counts)
    else:
      recs = self.source.read(record_N, counts)
    bad = list(recs.bad)
    if recs.texts is not None:
      tok_N, len_R = self.tokenizer.encode_flat(recs.texts)
    else:
      len_R = np.fromiter(map(len, recs.token_ids), np.int64, len(recs.token_ids))
      tok_N = np.concatenate(recs.token_ids) if len(len_R) else np.zeros(0, np.int32)
    good_R = np.ones(len(len_R), bool)
    if recs.token_ids is not None:
      out_T = (tok_N < 0) | (tok_N >= self.tokenizer.vocab_size)
      if out_T.any():
        record_T = np.repeat(np.arange(len(len_R)), len_R)
        for r in np.unique(record_T[out_T]).tolist():
          good_R[r] = False
          bad.append((recs.keep_N[r], f'a token id outside [0, {self.tokenizer.vocab_size}) '
                      '(pre-tokenized with another vocabulary?)'))
    for name, size in self.features.items():
      for r, v in enumerate(recs.features[name]):
        if not good_R[r]:
          continue
        if isinstance(v, int):
          why = None if 0 <= v < size else f'feature {name!r} = {v} is outside [0, {size})'
        elif len(v) != len_R[r]:
          why = f'feature {name!r} has {len(v)} values for {len_R[r]} tokens'
        elif len(v) and (v.min() < 0 or v.max() >= size):
          why = f'feature {name!r} has a value outside [0, {size})'
        else:
          why = None
        if why:
          good_R[r] = False
          bad.append((recs.keep_N[r], why))
    bad = sorted((int(k), why) for k, why in bad)
    return tok_N.astype(np.int32, copy=False), len_R, recs.features, recs.keep_N, good_R, bad

  def _rows(self, tok_N, offset_R, keys_R, feats, record_P, start_P, len_P, row_P, col_P,
            num_rows, counts):
    L, P, tok = self.max_len, self.num_predictions, self.tokenizer
    piece_C, j_C, offset_C = sequences.layout(start_P, len_P)
    # Usually every token is used once, in order (windows keep order): no gather needed.
    src_C = None
    if len(piece_C) == len(tok_N):  # pieces never overlap, so this means all, in order
      ids_C = tok_N
    else:
      src_C = offset_C + offset_R[record_P][piece_C]
      ids_C = tok_N[src_C]
    maskable_C = ~self._special_V[ids_C]
    word_start_C = tok.word_starts(ids_C, j_C == 1) if self.d.whole_word_mask else None
    masked_C, chosen_C = masking.mask_pieces(ids_C, maskable_C, piece_C, keys_R[record_P], offset_C,
                                             start_P, word_start_C, tok, self.d)
    # Segment number of each piece within its row (pieces sit in a row in column order).
    order = np.lexsort((col_P, row_P))
    seg_P = np.empty(len(row_P), np.int64)
    seg_P[order] = np.arange(len(order)) - np.searchsorted(row_P[order], np.arange(num_rows))[
        row_P[order]] + 1
    cls_P = row_P * L + col_P  # flat slot of each piece's [CLS]; [SEP] sits at cls_P + len_P + 1
    sep_P = cls_P + len_P + 1
    dest_C = cls_P[piece_C] + j_C
    seg_C = seg_P[piece_C]
    out = {}
    ids = np.full(num_rows * L, tok.pad_id, self._id_dtype)
    ids[dest_C], ids[cls_P], ids[sep_P] = masked_C, tok.cls_id, tok.sep_id
    seg = np.zeros(num_rows * L, self._pos_dtype)
    seg[dest_C], seg[cls_P], seg[sep_P] = seg_C, seg_P, seg_P
    pos = np.zeros(num_rows * L, self._pos_dtype)
    pos[dest_C], pos[sep_P] = j_C, len_P + 1
    out['input_ids'], out['segment_ids'] = ids.reshape(num_rows, L), seg.reshape(num_rows, L)
    out['positions'] = pos.reshape(num_rows, L)
    if tok.token_type_V is not None:  # from the unmasked ids: masking never changes a token's type
      types = np.zeros(num_rows * L, np.uint8)
      types[dest_C] = tok.token_type_V[ids_C]
      out['token_type_ids'] = types.reshape(num_rows, L)
    for name in self.features:
      if src_C is None:
        src_C = offset_C + offset_R[record_P][piece_C]
      out[name] = self._feature_rows(feats[name], record_P, piece_C, src_C, offset_R, dest_C, cls_P,
                                     sep_P, num_rows)
    # Prediction slots: a row's chosen tokens in piece order; past P slots they stay unmasked.
    idx_M = np.flatnonzero(chosen_C)
    r_M = row_P[piece_C[idx_M]]
    key = np.sort((r_M << 32) | np.arange(len(idx_M)))  # sorts values: cheaper than argsort
    by_row = key & 0xFFFFFFFF
    idx_M, r_M = idx_M[by_row], key >> 32
    slot_M = np.arange(len(idx_M)) - np.searchsorted(r_M, np.arange(num_rows))[r_M]
    d_M = dest_C[idx_M]
    over = slot_M >= P
    if over.any():
      counts['masked_over_cap'] = int(over.sum())
      ids[d_M[over]] = ids_C[idx_M[over]]
      keep = ~over
      r_M, d_M, slot_M, idx_M = r_M[keep], d_M[keep], slot_M[keep], idx_M[keep]
    flat_M = r_M * P + slot_M
    for name, dtype, values in (('mlm_positions', self._pos_dtype, d_M - r_M * L),
                                ('mlm_targets', self._id_dtype, ids_C[idx_M]),
                                ('mlm_weights', np.uint8, 1)):
      arr = np.zeros(num_rows * P, dtype)
      arr[flat_M] = values
      out[name] = arr.reshape(num_rows, P)
    return out

  def _feature_rows(self, values, record_P, piece_C, src_C, offset_R, dest_C, cls_P, sep_P, num_rows):
    """A feature as [rows, L]: per-record ints broadcast over the record's slots, per-token lists
    placed on their tokens ([CLS]/[SEP] get 0), 0 on padding."""
    arr = np.zeros(num_rows * self.max_len, np.int32)  # feature vocabularies are small: not worth it
    per_record = np.array([v if isinstance(v, int) else -1 for v in values], np.int64)
    rec_P = per_record[record_P]
    arr[dest_C] = rec_P[piece_C]
    arr[cls_P], arr[sep_P] = np.maximum(rec_P, 0), np.maximum(rec_P, 0)
    if (per_record < 0).any():  # per-token lists, laid out like the chunk's tokens
      flat = np.zeros(int(offset_R[-1]) + max(len(v) for v in values if not isinstance(v, int)) + 1,
                      np.int32)
      for r, v in enumerate(values):
        if not isinstance(v, int):
          flat[offset_R[r]:offset_R[r] + len(v)] = v
      token = (rec_P < 0)[piece_C]
      arr[dest_C[token]] = flat[src_C[token]]
    return arr.reshape(num_rows, self.max_len)


def _narrow(limit):
  return np.uint8 if limit <= 256 else np.uint16 if limit <= 65536 else np.int32


def widen(batch: dict) -> dict:
  """Wire rows -> the batch contract: int32 ids/positions, float32 weights, token_type_ids."""
  out = {k: v.astype(np.float32 if k == 'mlm_weights' else np.int32) for k, v in batch.items()}
  if 'token_type_ids' not in out:  # only tokenizers with a token_type_V send them
    out['token_type_ids'] = np.zeros_like(out['input_ids'])
  return out


class _Frozen(dict):
  __getattr__ = dict.__getitem__
