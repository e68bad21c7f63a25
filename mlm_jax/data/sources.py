"""Random-access record sources: text files and JSONL files (TFDS: tfds_source.py; the source of
each data.source: registry.py).

Every source reads records lazily by index (`read`), so nothing but offset indexes lives in memory,
and pickles cheaply into grain worker processes (indexes reload from the on-disk cache there).
"""
import collections
import hashlib
import json

import numpy as np
from absl import logging

from mlm_jax import paths
from mlm_jax.data import config as data_config
from mlm_jax.data import filereader, textindex
from mlm_jax.errors import ConfigError, DataError


class Records:
  """Records read for one chunk: texts (str) or pre-tokenized ids, and per-record features.

  `bad` lists the malformed records of the request as (position in the request, what is wrong):
  they are dropped like empty records, and the pipeline counts and reports them (data.bad_records).
  """

  def __init__(self, keep_N, texts=None, token_ids=None, features=None, bad=()):
    self.keep_N = np.asarray(keep_N, np.int64)  # positions (in the request) of the records kept
    self.texts = texts
    self.token_ids = token_ids
    self.features = features or {}
    self.bad = list(bad)


class Malformed:
  """A record that does not parse (stands in for the parsed object); `why` says what is wrong."""

  def __init__(self, why: str, raw: bytes = b''):
    self.why, self.raw = why, raw


def new_counts() -> collections.Counter:
  """Counters a source bumps while reading (see stats.CHUNK_COUNTERS)."""
  return collections.Counter()


def expand_globs(spec: str, field: str) -> list[str]:
  """The files of comma-separated globs, local or on an object store (gs://bucket/dir/*.txt)."""
  files = []
  for pattern in (p for p in spec.split(',') if p.strip()):
    matches = paths.glob(data_config.expand_path(pattern))
    if not matches:
      raise DataError(f'config.data.{field}: {pattern.strip()!r} matches no file')
    files += matches
  if not files:
    raise ConfigError(f'data.{field}', 'no files given')
  return files


_SKIPPED_UTF8 = 'invalid UTF-8 (data.invalid_utf8=skip)'


def decode(raw: list[bytes], policy: str, counts: dict) -> Records:
  """Decodes UTF-8 records; NUL bytes are dropped and invalid UTF-8 replaced or skipped, counted
  (a skipped record is a bad record)."""
  keep, texts, bad = [], [], []
  for i, b in enumerate(raw):
    if b'\0' in b:
      counts['nul_bytes'] += b.count(b'\0')
      b = b.replace(b'\0', b'')
    try:
      s = b.decode('utf-8')
    except UnicodeDecodeError:
      counts['invalid_utf8_records'] += 1
      if policy == 'skip':
        bad.append((i, _SKIPPED_UTF8))
        continue
      s = b.decode('utf-8', 'replace')
    keep.append(i)
    texts.append(s)
  return Records(keep, texts=texts, bad=bad)


class TextSource:
  """Plain text files; one record per line or per blank-line-separated block."""

  def __init__(self, files, unit, cache, limit=0, invalid_utf8='replace'):
    self.fileset = filereader.FileSet(files, unit, cache, limit)
    self.invalid_utf8 = invalid_utf8
    self.name = ','.join(files)

  def __len__(self):
    return self.fileset.n

  def read_raw(self, ids_N) -> list[bytes]:
    return self.fileset.read(ids_N)

  def read_flat(self, ids_N) -> tuple[np.ndarray, np.ndarray]:
    return self.fileset.read_flat(ids_N)

  def read(self, ids_N, counts) -> Records:
    return decode(self.read_raw(ids_N), self.invalid_utf8, counts)

  def where(self, i):
    return self.fileset.where(i)

  def split_keys(self, key_field, stratify_field):
    return self.fileset.hashes(), None


def _is_id_list(value) -> bool:
  if isinstance(value, np.ndarray):
    return value.ndim == 1 and (value.dtype.kind in 'iu' or not len(value))
  return isinstance(value, list) and all(
      isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)


def _int32(value) -> np.ndarray | None:
  """A list of ints as an int32 array; None if one does not fit."""
  try:
    return np.asarray(value, np.int32)
  except OverflowError:
    return None


def _int_feature(value, name):
  """(value as int or int32 array, None) or (None, what is wrong)."""
  if isinstance(value, np.integer):
    return int(value), None
  if isinstance(value, int) and not isinstance(value, bool):
    return value, None
  array = _int32(value) if _is_id_list(value) else None
  if array is not None:
    return array, None
  return None, f'feature {name!r} must be an int or a list of ints (int32), got {_short(value)}'


def _short(value) -> str:
  return ' '.join(repr(value).split())[:60]


def text_kind(value) -> str | None:
  """'text' (str or bytes), 'ids' (a list of token ids) or None (neither) of a text field."""
  if isinstance(value, (str, bytes)):
    return 'text'
  return 'ids' if _is_id_list(value) else None


def first_kind(source, block=256) -> str:
  """Whether `source` holds text or token ids: what its first well-formed record holds.

  Fixed per corpus (records of the other kind are bad records), so the choice never depends on
  how records fall into chunks; 'text' when no record is well-formed.
  """
  counts = new_counts()
  for lo in range(0, len(source), block):
    for _, obj in source.objects(np.arange(lo, min(len(source), lo + block)), counts):
      if isinstance(obj, dict) and source.text_field in obj:
        value = obj[source.text_field]
        kind = text_kind(value)
        if kind == 'text' or (kind == 'ids' and len(value)):  # [] could be either
          return kind
  return 'text'


class JsonlSource:
  """JSON Lines: one object per line with a text field (a string, or a list of token ids) and
  integer feature fields (one int per record, or a list with one int per token)."""

  def __init__(self, files, cache, text_field, feature_names, limit=0, invalid_utf8='replace'):
    self.fileset = filereader.FileSet(files, 'line', cache, limit)
    self.text_field, self.feature_names = text_field, tuple(feature_names)
    self.invalid_utf8 = invalid_utf8
    self.name = ','.join(files)
    self._kind = None

  def __len__(self):
    return self.fileset.n

  @property
  def kind(self) -> str:
    if self._kind is None:
      self._kind = first_kind(self)
    return self._kind

  def _parse(self, raw, counts):
    try:
      return json.loads(raw)
    except UnicodeDecodeError:
      counts['invalid_utf8_records'] += 1
      if self.invalid_utf8 == 'skip':
        return Malformed(_SKIPPED_UTF8, raw)
      return self._parse(raw.decode('utf-8', 'replace').encode('utf-8'), counts)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
      return Malformed(f'not valid JSON ({" ".join(str(e).split())[:80]})', raw)

  def where(self, i):
    return self.fileset.where(i)

  def objects(self, ids_N, counts):
    """(record id, parsed JSON value or Malformed) of each requested record."""
    raw = self.fileset.read(ids_N)
    for i, b in zip(np.asarray(ids_N).tolist(), raw):
      if b'\0' in b:
        counts['nul_bytes'] += b.count(b'\0')
        b = b.replace(b'\0', b'')
      yield i, self._parse(b, counts)

  def read(self, ids_N, counts) -> Records:
    return records_from_objects(self.objects(ids_N, counts), self.text_field, self.feature_names,
                                self.kind, self.invalid_utf8, counts)

  def split_keys(self, key_field, stratify_field):
    return keys_from_objects(self, key_field, stratify_field)


def _check_object(obj, text_field, feature_names, kind):
  """What is wrong with a record (None: nothing); `kind` is the corpus's 'text' or 'ids'."""
  if isinstance(obj, Malformed):
    return obj.why
  if not isinstance(obj, dict):
    return f'not a JSON object: {_short(obj)}'
  if text_field not in obj:
    return f'no {text_field!r} field (data.text_field)'
  got = text_kind(obj[text_field])
  if got is None:
    return f'{text_field!r} must be a string or a list of token ids, got {_short(obj[text_field])}'
  if got != kind and len(obj[text_field]):  # an empty list is an empty record of either kind
    return (f'{text_field!r} holds {"token ids" if got == "ids" else "text"}, but this corpus '
            f'holds {"text" if kind == "text" else "token ids"} (as its first record does)')
  for name in feature_names:
    if name not in obj:
      return f'no feature field {name!r} (model.extra_embeddings)'
  return None


def _parse_record(obj, text_field, feature_names, kind, invalid_utf8, counts):
  """(text or int32 ids, {feature: value}, None) of a good record, or (None, None, why)."""
  why = _check_object(obj, text_field, feature_names, kind)
  feats = {}
  for name in feature_names if why is None else ():
    feats[name], why = _int_feature(obj[name], name)
    if why:
      break
  if why:
    return None, None, why
  value = obj[text_field]
  if isinstance(value, bytes):  # TFDS text
    try:
      value = value.decode('utf-8')
    except UnicodeDecodeError:
      counts['invalid_utf8_records'] += 1
      if invalid_utf8 == 'skip':
        return None, None, _SKIPPED_UTF8
      value = value.decode('utf-8', 'replace')
  if kind == 'text':
    return (value if isinstance(value, str) else ''), feats, None  # '' for an empty list
  value = np.zeros(0, np.int32) if isinstance(value, str) else _int32(value)
  if value is None:
    return None, None, f'{text_field!r} has a token id that is not an int32'
  return value, feats, None


def records_from_objects(objects, text_field, feature_names, kind, invalid_utf8='replace',
                         counts=None):
  """Records of (record id, parsed object) pairs of a corpus of `kind` ('text' or 'ids');
  malformed ones go to `Records.bad`."""
  counts = new_counts() if counts is None else counts
  keep, values, bad = [], [], []
  features = {name: [] for name in feature_names}
  for k, (_, obj) in enumerate(objects):
    value, feats, why = _parse_record(obj, text_field, feature_names, kind, invalid_utf8, counts)
    if why:
      bad.append((k, why))
      continue
    keep.append(k)
    values.append(value)
    for name in feature_names:
      features[name].append(feats[name])
  return Records(keep, texts=values if kind == 'text' else None,
                 token_ids=values if kind == 'ids' else None, features=features, bad=bad)


def _plain(value):
  """numpy scalars/arrays (TFDS) -> Python ints/lists, so one validation covers every source."""
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  return value


def _hash_value(value) -> int:
  data = value if isinstance(value, bytes) else json.dumps(
      _plain(value), sort_keys=True, default=repr).encode()
  return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), 'little')


def keys_from_objects(source, key_field, stratify_field, chunk=4096):
  """Split-key hashes (and stratum ids) of every record: one pass, at start-up.

  A malformed record is split by a hash of its bytes (it is dropped when read anyway) and forms a
  stratum of its own; a record without the key field is split by its whole content, one without
  the stratify field joins the stratum of null.
  """
  n = len(source)
  hashes = np.zeros(n, np.uint64)
  strata, codes = (np.zeros(n, np.int64), {}) if stratify_field else (None, None)
  field = key_field or source.text_field
  counts, missing, first_missing = new_counts(), 0, None
  for lo in range(0, n, chunk):
    for i, obj in source.objects(np.arange(lo, min(n, lo + chunk)), counts):
      if isinstance(obj, Malformed) or not isinstance(obj, dict):
        hashes[i] = _hash_value(obj.raw if isinstance(obj, Malformed) else obj)
        if stratify_field:
          strata[i] = codes.setdefault('<malformed>', len(codes))
        continue
      if field in obj:
        hashes[i] = _hash_value(obj[field])
      else:
        missing += 1
        first_missing = source.where(i) if first_missing is None else first_missing
        hashes[i] = _hash_value(obj)
      if stratify_field:
        value = json.dumps(_plain(obj.get(stratify_field)), sort_keys=True, default=repr)
        strata[i] = codes.setdefault(value, len(codes))
  if missing:
    logging.warning('%s: %d records have no split key field %r (first: %s); they are split by '
                    'their whole content', source.name, missing, field, first_missing)
  return hashes, strata


def check_tokenizer(source, tokenizer):
  """A pre-tokenized source must have been written with this very tokenizer."""
  saved = (getattr(source, 'metadata', None) or {}).get('tokenizer')
  if saved and saved.get('fingerprint') != tokenizer.fingerprint():
    raise ConfigError('data.tokenizer', f'{source.name} was pre-tokenized with another tokenizer '
                      f'({saved.get("kind")}, vocab {saved.get("vocab_size")}); set data.tokenizer/'
                      f'vocab_path/alphabet/lowercase to the ones prepare_corpus used')


def split_files(config, split: str) -> list[str] | None:
  """The files of `split` ('train' or 'eval'), globs expanded; None when the split has none."""
  spec = config.data.train_files if split == 'train' else config.data.eval_files
  return expand_globs(spec, f'{split}_files') if spec.strip() else None


def open_text(config, split: str) -> TextSource | None:
  d = config.data
  cache = textindex.cache_dir(d.cache_dir)
  files = split_files(config, split)
  return None if files is None else TextSource(files, d.text_unit, cache, d.max_records,
                                                d.invalid_utf8)


def open_jsonl(config, split: str) -> JsonlSource | None:
  d = config.data
  cache = textindex.cache_dir(d.cache_dir)
  files = split_files(config, split)
  return None if files is None else JsonlSource(
      files, cache, d.text_field, list(config.model.extra_embeddings.keys()), d.max_records,
      d.invalid_utf8)
