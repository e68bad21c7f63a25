"""Counters of what the pipeline did to the input (bad records, cut records, padding)."""
import collections

import numpy as np
from absl import logging

from mlm_jax.errors import DataError

# Counted in the workers, per chunk; shipped to the training process inside the batch.
CHUNK_COUNTERS = (
    'records',               # records read
    'invalid_utf8_records',  # records with invalid UTF-8 (replaced or skipped, see data.invalid_utf8)
    'nul_bytes',             # NUL bytes dropped
    'empty_records',         # records with no tokens after tokenizing (skipped)
    'long_records',          # records longer than max_len - 2 (windowed or truncated)
    'unk_tokens',            # tokens that became [UNK]
    'bad_records',           # malformed records dropped (bad JSON, a missing or mistyped field, no
                             # domain name, a feature that does not fit, ...; see data.bad_records)
    'invalid_events',        # session events dropped from their session (unknown type, not an object)
    'masked_over_cap',       # chosen tokens left unmasked because a row had more than P
    'pieces',                # records or windows placed in rows
)
# Counted once at start-up or in the training process.
OTHER_COUNTERS = ('empty_lines', 'rows', 'real_tokens', 'slots')
_BAD = ('invalid_utf8_records', 'nul_bytes', 'empty_records', 'unk_tokens', 'bad_records',
        'invalid_events', 'masked_over_cap', 'empty_lines')
_NOTE = ('long_records',)  # expected in real corpora: logged at INFO
_HINTS = {'masked_over_cap': ' (rows with more chosen tokens than data.max_predictions slots; a few '
                             'per million are harmless, more: raise data.max_predictions)'}


def chunk_vector(counts: dict) -> np.ndarray:
  return np.array([counts.get(k, 0) for k in CHUNK_COUNTERS], np.float64)


SHOW_BAD = 5  # bad records logged with file and line; later ones are only counted
# data.max_bad_fraction is checked once this many records were read: a few bad lines among the
# first records read must not stop a run.
MIN_RECORDS_FOR_FRACTION = 1000


class Stats:
  """Running totals for one pipeline (train or eval); `log()` writes them with absl logging.

  With a `source`, bad records are reported: the first SHOW_BAD with file and line (`source.where`),
  and a DataError once more than `max_bad_fraction` of the records read are bad.
  """

  def __init__(self, name: str, source=None, max_bad_fraction: float = 1.0):
    self.name = name
    self.counts = collections.Counter()
    self._warned = set()
    self.source, self.max_bad_fraction = source, max_bad_fraction
    self._shown, self._first_bad = set(), None  # record ids of the bad records logged

  def add_chunk(self, vec_K: np.ndarray, bad=()) -> None:
    """Adds a chunk's counters; `bad` is the chunk's first few (record id, what is wrong)."""
    for k, v in zip(CHUNK_COUNTERS, vec_K.tolist()):
      if v:
        self.counts[k] += int(v)
    for i, why in bad:
      if len(self._shown) == SHOW_BAD or i in self._shown:  # a record comes back every epoch
        continue
      self._shown.add(i)
      where = self.source.where(int(i)) if hasattr(self.source, 'where') else f'record {i}'
      self._first_bad = self._first_bad or f'{where}: {why}'
      logging.warning('data/%s: skipped bad record %s: %s%s', self.name, where, why,
                      ' (later ones are only counted, as bad_records)'
                      if len(self._shown) == SHOW_BAD else '')
    read, bad_records = self.counts['records'], self.counts['bad_records']
    if read >= MIN_RECORDS_FOR_FRACTION and bad_records > self.max_bad_fraction * read:
      raise DataError(f'{getattr(self.source, "name", self.name)}: {bad_records} of the {read} '
                      f'records read are bad ({bad_records / read:.1%}, more than '
                      f'data.max_bad_fraction={self.max_bad_fraction}); the first: {self._first_bad}')

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
