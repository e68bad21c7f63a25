"""Random-access record sources: text files, JSONL files and TFDS array_record datasets.

Every source reads records lazily by index (`read`), so nothing but offset indexes lives in memory,
and pickles cheaply into grain worker processes (indexes reload from the on-disk cache there).
"""
import collections
import glob
import hashlib
import json
import mmap
import os

import numpy as np

from mlm_jax.data import config as data_config
from mlm_jax.data import textindex
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


class _FileSet:
  """Records of several indexed files, numbered consecutively across files.

  Reads gather a chunk's bytes straight out of a read-only mmap of each file (one numpy fancy-index,
  no syscall per record). Touched pages are dropped from the mapping every _RELEASE_BYTES, so the
  process's resident memory stays flat however large the corpus is.
  """

  _RELEASE_BYTES = 64 << 20

  def __init__(self, files, unit, cache, limit):
    self.files, self.unit, self.cache = files, unit, cache
    indexes = [self._index(p) for p in files]
    self.bounds = np.concatenate([[0], np.cumsum([len(ix['start']) for ix in indexes])]).astype(np.int64)
    self.empty_lines = sum(int(ix['empty']) for ix in indexes)
    self.n = int(self.bounds[-1]) if not limit else min(limit, int(self.bounds[-1]))
    self._indexes, self._maps, self._touched = None, None, 0

  def __getstate__(self):  # workers reload indexes from the cache and map the files themselves
    return {k: v for k, v in self.__dict__.items() if k not in ('_indexes', '_maps')}

  def __setstate__(self, state):
    self.__dict__.update(state, _indexes=None, _maps=None)

  def _index(self, path):
    return textindex.load_index(path, self.unit, self.cache)

  def _load(self):
    if self._indexes is None:
      self._indexes = [self._index(p) for p in self.files]
      self._maps = []
      for p in self.files:
        with open(p, 'rb') as f:
          size = os.fstat(f.fileno()).st_size
          mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self._maps.append((mm, np.frombuffer(mm, np.uint8) if mm else np.zeros(0, np.uint8)))

  def locate(self, ids_N):
    f_N = np.searchsorted(self.bounds, ids_N, side='right') - 1
    return f_N, ids_N - self.bounds[f_N]

  def read_flat(self, ids_N) -> tuple[np.ndarray, np.ndarray]:
    """The records' bytes concatenated (uint8) and their lengths."""
    self._load()
    f_N, local_N = self.locate(np.asarray(ids_N, np.int64))
    if len(self.files) == 1:
      start_N, end_N = (self._indexes[0][k][local_N] for k in ('start', 'end'))
    else:
      start_N, end_N = np.zeros(len(f_N), np.int64), np.zeros(len(f_N), np.int64)
      for f in np.unique(f_N).tolist():
        sel = f_N == f
        start_N[sel] = self._indexes[f]['start'][local_N[sel]]
        end_N[sel] = self._indexes[f]['end'][local_N[sel]]
    len_N = end_N - start_N
    dest_N = np.cumsum(len_N) - len_N
    src = np.repeat(start_N - dest_N, len_N) + np.arange(int(len_N.sum()))
    if len(self.files) == 1:
      out = self._maps[0][1][src]
    else:
      out = np.empty(len(src), np.uint8)
      file_of_byte = np.repeat(f_N, len_N)
      for f in np.unique(f_N).tolist():
        sel = file_of_byte == f
        out[sel] = self._maps[f][1][src[sel]]
    self._touched += len(src) * 8  # a rough bound on pages touched by scattered small records
    if self._touched > self._RELEASE_BYTES:
      for mm, _ in self._maps:
        if mm is not None:
          mm.madvise(mmap.MADV_DONTNEED)
      self._touched = 0
    return out, len_N

  def read(self, ids_N) -> list[bytes]:
    flat, len_N = self.read_flat(ids_N)
    data, ends = flat.tobytes(), np.cumsum(len_N).tolist()
    return [data[e - n:e] for e, n in zip(ends, len_N.tolist())]

  def hashes(self):
    self._load()
    return np.concatenate([ix['hash'] for ix in self._indexes])[:self.n]

  def where(self, i) -> str:
    """'file:line' of record i, for error messages (counts newlines, so only on the error path)."""
    self._load()
    f, local = (int(x[0]) for x in self.locate(np.array([i])))
    start = int(self._indexes[f]['start'][local])
    with open(self.files[f], 'rb') as fh:
      line = fh.read(start).count(b'\n') + 1
    return f'{self.files[f]}:{line}'


class TextSource:
  """Plain text files; one record per line or per blank-line-separated block."""

  has_fields = False

  def __init__(self, files, unit, cache, limit=0, invalid_utf8='replace'):
    self.fileset = _FileSet(files, unit, cache, limit)
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

  has_fields = True

  def __init__(self, files, cache, text_field, feature_names, limit=0, invalid_utf8='replace'):
    self.fileset = _FileSet(files, 'line', cache, limit)
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
    return _records_from_objects(self.objects(ids_N, counts), self.text_field, self.feature_names,
                                 self.where)

  def split_keys(self, key_field, stratify_field):
    return _keys_from_objects(self, key_field, stratify_field)


def _records_from_objects(objects, text_field, feature_names, where):
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


def _keys_from_objects(source, key_field, stratify_field, chunk=4096):
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
        strata[i] = codes.setdefault(json.dumps(_plain(obj[stratify_field]), sort_keys=True), len(codes))
  return hashes, strata




class TfdsSource:
  """A TFDS dataset read through `tfds.data_source` (array_record, random access)."""

  has_fields = True

  def __init__(self, name, split, data_dir, text_field, feature_names, limit=0):
    self.args = (name, split, data_dir or None)
    self.text_field, self.feature_names = text_field, tuple(feature_names)
    self.name = f'tfds:{name}[{split}]'
    self._ds = None
    self.n = len(self._source())
    self.metadata = _read_json(os.path.join(str(self._source().dataset_info.data_dir),
                                            'metadata.json'))
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

  def read(self, ids_N, counts) -> Records:
    return _records_from_objects(self.objects(ids_N, counts), self.text_field, self.feature_names,
                                 self.where)

  def split_keys(self, key_field, stratify_field):
    return _keys_from_objects(self, key_field, stratify_field)


def _read_json(path):
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def check_tokenizer(source, tokenizer):
  """A pre-tokenized source must have been written with this very tokenizer."""
  saved = (getattr(source, 'metadata', None) or {}).get('tokenizer')
  if saved and saved.get('fingerprint') != tokenizer.fingerprint():
    raise ConfigError('data.tokenizer', f'{source.name} was pre-tokenized with another tokenizer '
                      f'({saved.get("kind")}, vocab {saved.get("vocab_size")}); set data.tokenizer/'
                      f'vocab_path/alphabet/lowercase to the ones prepare_corpus used')


def open_source(config, split: str):
  """The source of `split` ('train' or 'eval') as config.data describes; None if eval is carved."""
  d = config.data
  features = list(config.model.extra_embeddings.keys())
  cache = textindex.cache_dir(d.cache_dir) if d.source != 'tfds' else ''
  if d.source == 'tfds':
    tfds_split = d.tfds_train_split if split == 'train' else d.tfds_eval_split
    if not tfds_split:
      return None
    return TfdsSource(d.tfds_name, tfds_split, d.tfds_data_dir, d.text_field, features,
                      d.max_records)
  spec = d.train_files if split == 'train' else d.eval_files
  if not spec.strip():
    return None
  files = expand_globs(spec, f'{split}_files')
  if d.source == 'text':
    return TextSource(files, d.text_unit, cache, d.max_records, d.invalid_utf8)
  return JsonlSource(files, cache, d.text_field, features, d.max_records, d.invalid_utf8)
