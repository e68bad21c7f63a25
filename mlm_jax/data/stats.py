"""Counters of what the pipeline did to the input (bad records, cut records, padding)."""
import collections

import numpy as np
from absl import logging

# Counted in the workers, per chunk; shipped to the training process inside the batch.
CHUNK_COUNTERS = (
    'records',               # records read
    'invalid_utf8_records',  # records with invalid UTF-8 (replaced or skipped, see data.invalid_utf8)
    'nul_bytes',             # NUL bytes dropped
    'empty_records',         # records with no tokens after tokenizing (skipped)
    'long_records',          # records longer than max_len - 2 (windowed or truncated)
    'unk_tokens',            # tokens that became [UNK]
    'bad_feature_records',   # records whose per-token feature list does not match the tokens (skipped)
    'masked_over_cap',       # chosen tokens left unmasked because a row had more than P
    'pieces',                # records or windows placed in rows
    'invalid_records',       # records (or session events) the source could not use (skipped)
)
# Counted once at start-up or in the training process.
OTHER_COUNTERS = ('empty_lines', 'rows', 'real_tokens', 'slots')
_BAD = ('invalid_utf8_records', 'nul_bytes', 'empty_records', 'unk_tokens', 'bad_feature_records',
        'masked_over_cap', 'empty_lines', 'invalid_records')
_NOTE = ('long_records',)  # expected in real corpora: logged at INFO
_HINTS = {'masked_over_cap': ' (rows with more chosen tokens than data.max_predictions slots; a few '
                             'per million are harmless, more: raise data.max_predictions)'}


def chunk_vector(counts: dict) -> np.ndarray:
  return np.array([counts.get(k, 0) for k in CHUNK_COUNTERS], np.float64)


class Stats:
  """Running totals for one pipeline (train or eval); `log()` writes them with absl logging."""

  def __init__(self, name: str):
    self.name = name
    self.counts = collections.Counter()
    self._warned = set()

  def add_chunk(self, vec_K: np.ndarray) -> None:
    for k, v in zip(CHUNK_COUNTERS, vec_K.tolist()):
      if v:
        self.counts[k] += int(v)

  def add_batch(self, segment_ids_BL: np.ndarray) -> None:
    self.counts['rows'] += segment_ids_BL.shape[0]
    self.counts['real_tokens'] += int(np.count_nonzero(segment_ids_BL))
    self.counts['slots'] += segment_ids_BL.size
    for k in _BAD + _NOTE:
      if self.counts[k] and k not in self._warned:  # once per counter; totals come with log()
        self._warned.add(k)
        logging.log(logging.WARNING if k in _BAD else logging.INFO,
                    'data/%s: %s: %d so far%s', self.name, k, self.counts[k], _HINTS.get(k, ''))

  @property
  def padding_fraction(self) -> float:
    return 1.0 - self.counts['real_tokens'] / max(1, self.counts['slots'])

  def as_dict(self) -> dict:
    out = {k: self.counts[k] for k in CHUNK_COUNTERS + OTHER_COUNTERS}
    out['padding_fraction'] = self.padding_fraction
    return out

  def log(self) -> None:
    logging.info('data/%s: %s', self.name,
                 ', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}'
                           for k, v in self.as_dict().items()))
