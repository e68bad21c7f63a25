"""Random-access record sources: text files and JSONL files (TFDS: tfds_source.py; the source of
each data.source: registry.py).

Every source reads records lazily by index (`read`), so nothing but offset indexes lives in memory,
and pickles cheaply into grain worker processes (indexes reload from the on-disk cache there).
"""
import collections
import glob
import hashlib
import json

import numpy as np

from mlm_jax.data import config as data_config
from mlm_jax.data import filereader, textindex
from mlm_jax.errors import ConfigError, DataError


class Records:
  """Records read for one chunk: texts (str) or pre-tokenized ids, and per-record features."""

  def __init__(self, keep_N, texts=None, token_ids=None, features=None):
    self.keep_N = np.asarray(keep_N, np.int64)  # positions (in the request) of the records kept
    self.texts = texts
    self.token_ids = token_ids
    self.features = features or {}


def new_counts() -> collections.Counter:
  """Counters a source bumps while reading (see stats.CHUNK_COUNTERS)."""
  return collections.Counter()


def expand_globs(spec: str, field: str) -> list[str]:
  files = []
  for pattern in (p for p in spec.split(',') if p.strip()):
    matches = sorted(glob.glob(data_config.expand_path(pattern)))
    if not matches:
      raise DataError(f'config.data.{field}: {pattern.strip()!r} matches no file')
    files += matches
  if not files:
    raise ConfigError(f'data.{field}', 'no files given')
  return files


def decode(raw: list[bytes], policy: str, counts: dict) -> tuple[np.ndarray, list[str]]:
  """Decodes UTF-8 records; NUL bytes are dropped and invalid UTF-8 replaced or skipped, counted."""
  keep, texts = [], []
  for i, b in enumerate(raw):
    if b'\0' in b:
      counts['nul_bytes'] += b.count(b'\0')
      b = b.replace(b'\0', b'')
    try:
      s = b.decode('utf-8')
    except UnicodeDecodeError:
      counts['invalid_utf8_records'] += 1
      if policy == 'skip':
        continue
      s = b.decode('utf-8', 'replace')
    keep.append(i)
    texts.append(s)
  return np.array(keep, np.int64), texts


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
    keep, texts = decode(self.read_raw(ids_N), self.invalid_utf8, counts)
    return Records(keep, texts=texts)

  def split_keys(self, key_field, stratify_field):
    return self.fileset.hashes(), None


def _int_feature(value, name, where):
  if isinstance(value, np.ndarray) and value.dtype.kind in 'iu':
    return value.astype(np.int32, copy=False)
  if isinstance(value, np.integer):
    return int(value)
  if isinstance(value, bool) or not (isinstance(value, int) or (
      isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value))):
    raise DataError(f'{where()}: feature {name!r} must be an int or a list of ints, got {value!r:.80}')
  return value if isinstance(value, int) else np.asarray(value, np.int32)


class JsonlSource:
  """JSON Lines: one object per line with a text field (a string, or a list of token ids) and
  integer feature fields (one int per record, or a list with one int per token)."""

  def __init__(self, files, cache, text_field, feature_names, limit=0, invalid_utf8='replace'):
    self.fileset = filereader.FileSet(files, 'line', cache, limit)
    self.text_field, self.feature_names = text_field, tuple(feature_names)
    self.invalid_utf8 = invalid_utf8
    self.name = ','.join(files)

  def __len__(self):
    return self.fileset.n

  def _parse(self, raw, i, counts):
    try:
      return json.loads(raw)
    except UnicodeDecodeError:
      counts['invalid_utf8_records'] += 1
      if self.invalid_utf8 == 'skip':
        return None
      return json.loads(raw.decode('utf-8', 'replace'))
    except ValueError as e:
      raise DataError(f'{self.fileset.where(i)}: not valid JSON ({e})') from None

  def where(self, i):
    return self.fileset.where(i)

  def objects(self, ids_N, counts):
    raw = self.fileset.read(ids_N)
    for i, b in zip(np.asarray(ids_N).tolist(), raw):
      if b'\0' in b:
        counts['nul_bytes'] += b.count(b'\0')
        b = b.replace(b'\0', b'')
      yield i, self._parse(b, i, counts)

  def read(self, ids_N, counts) -> Records:
    return records_from_objects(self.objects(ids_N, counts), self.text_field, self.feature_names,
                                 self.where)

  def split_keys(self, key_field, stratify_field):
    return keys_from_objects(self, key_field, stratify_field)


def records_from_objects(objects, text_field, feature_names, where):
  keep, texts, token_ids = [], [], []
  features = {name: [] for name in feature_names}
  for k, (i, obj) in enumerate(objects):
    if obj is None:
      continue
    if not isinstance(obj, dict) or text_field not in obj:
      raise DataError(f'{where(i)}: record has no {text_field!r} field (config.data.text_field)')
    value = obj[text_field]
    if isinstance(value, bytes):
      value = value.decode('utf-8', 'replace')
    if isinstance(value, str):
      texts.append(value)
    elif isinstance(value, np.ndarray) or (isinstance(value, list) and all(
        isinstance(v, int) for v in value)):
      token_ids.append(np.asarray(value, np.int32))
    else:
      raise DataError(f'{where(i)}: {text_field!r} must be a string or a list of token ids')
    for name in feature_names:
      if name not in obj:
        raise DataError(f'{where(i)}: record has no feature field {name!r} (model.extra_embeddings)')
      features[name].append(_int_feature(obj[name], name, lambda: where(i)))
    keep.append(k)
  if texts and token_ids:
    raise DataError(f'{where(0)}: mixes text and pre-tokenized records in {text_field!r}')
  return Records(keep, texts=texts if texts or not token_ids else None,
                 token_ids=token_ids or None, features=features)


def _plain(value):
  """numpy scalars/arrays (TFDS) -> Python ints/lists, so one validation covers every source."""
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  return value


def _hash_value(value) -> int:
  data = value if isinstance(value, bytes) else json.dumps(_plain(value), sort_keys=True).encode()
  return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), 'little')


def keys_from_objects(source, key_field, stratify_field, chunk=4096):
  """Split-key hashes (and stratum ids) of every record: one pass, at start-up."""
  n = len(source)
  hashes = np.zeros(n, np.uint64)
  strata, codes = (np.zeros(n, np.int64), {}) if stratify_field else (None, None)
  counts = new_counts()
  for lo in range(0, n, chunk):
    for i, obj in source.objects(np.arange(lo, min(n, lo + chunk)), counts):
      if obj is None:
        continue
      field = key_field or source.text_field
      if field not in obj:
        raise DataError(f'{source.where(i)}: record has no split key field {field!r}')
      hashes[i] = _hash_value(obj[field])
      if stratify_field:
        if stratify_field not in obj:
          raise DataError(f'{source.where(i)}: record has no stratify field {stratify_field!r}')
        value = json.dumps(_plain(obj[stratify_field]), sort_keys=True)
        strata[i] = codes.setdefault(value, len(codes))
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
