"""TFDS datasets (array_record) as a record source, through `tfds.data_source`.

data.tfds_data_dir may be local or gs://: TFDS reads its metadata through etils.epath and
array_record reads the records with its own GCS client (google-cloud-cpp).
"""
import json

import numpy as np
from etils import epath

from mlm_jax.data import sources
from mlm_jax.errors import DataError


class TfdsSource:
  """A TFDS dataset read through `tfds.data_source` (array_record, random access)."""

  def __init__(self, name, split, data_dir, text_field, feature_names, limit=0,
               invalid_utf8='replace'):
    self.args = (name, split, data_dir or None)
    self.text_field, self.feature_names = text_field, tuple(feature_names)
    self.invalid_utf8 = invalid_utf8
    self._kind = None
    self.name = f'tfds:{name}[{split}]'
    self._ds = None
    self.n = len(self._source())
    self.metadata = _read_json(epath.Path(self._source().dataset_info.data_dir) / 'metadata.json')
    if limit:
      self.n = min(self.n, limit)

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != '_ds'}

  def __setstate__(self, state):
    self.__dict__.update(state, _ds=None)

  def _source(self):
    if self._ds is None:
      import tensorflow_datasets as tfds  # heavy: only where a TFDS source is used
      name, split, data_dir = self.args
      try:
        self._ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
      except Exception as e:  # tfds raises many types for a missing/unprepared dataset
        raise DataError(f'{self.name} (data_dir={data_dir}): cannot open ({type(e).__name__}: '
                        f'{str(e).splitlines()[0] if str(e) else ""})') from None
    return self._ds

  def __len__(self):
    return self.n

  def where(self, i):
    return f'{self.name} record {i}'

  def objects(self, ids_N, counts):
    ids = np.asarray(ids_N).tolist()
    return zip(ids, self._source().__getitems__(ids))

  @property
  def kind(self) -> str:
    """'text' or 'ids' (pre-tokenized by tools/prepare_corpus.py), from the first good record."""
    if self._kind is None:
      self._kind = sources.first_kind(self)
    return self._kind

  def read(self, ids_N, counts) -> sources.Records:
    return sources.records_from_objects(self.objects(ids_N, counts), self.text_field,
                                        self.feature_names, self.kind, self.invalid_utf8, counts)

  def split_keys(self, key_field, stratify_field):
    return sources.keys_from_objects(self, key_field, stratify_field)


def _read_json(path):
  try:
    return json.loads(epath.Path(path).read_bytes().decode('utf-8'))
  except (OSError, ValueError):
    return {}


def open_source(config, split: str) -> TfdsSource | None:
  """data.tfds_train_split / tfds_eval_split of data.tfds_name; None for an empty eval split."""
  d = config.data
  tfds_split = d.tfds_train_split if split == 'train' else d.tfds_eval_split
  if not tfds_split:
    return None
  return TfdsSource(d.tfds_name, tfds_split, d.tfds_data_dir, d.text_field,
                    list(config.model.extra_embeddings.keys()), d.max_records, d.invalid_utf8)
