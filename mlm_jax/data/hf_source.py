"""Hugging Face `datasets` as a record source (data.source='hf').

A `save_to_disk` directory or anything `datasets.load_dataset` opens (local files, a local data
directory, the local hub cache). Two ways to read it:

- By index (default): a `datasets.Dataset` is Arrow tables, memory-mapped, with random access, so
  it plugs in like TFDS: the pipeline shuffles, shards, carves splits and resumes as for any source.
- Streamed (data.hf_streaming): an `IterableDataset` has no length and no random access, so each
  input shard s of S reads its own endless sequence of records: the dataset's shards (usually its
  files) h with h % S == s, in an order seeded by (seed, s, epoch), each one's records in file
  order. Record id = (position in that sequence, s, S), so chunk k (positions [kC, (k+1)C)) is a
  pure function of k: the same batches for any worker count and after a resume, which reaches the
  saved position by reading forward in Arrow batches without tokenizing (`_Cursor`). With fewer
  dataset shards than input shards every input shard reads them all and keeps every S-th record.
  The pipeline asks a stream for each split (`HfStreams.split`): eval/test are carved record by
  record with the same hash as by index, so a dataset streamed or not carves the same records.
"""
import collections
import threading

import numpy as np
from absl import logging
from etils import epath

from mlm_jax.data import config as data_config
from mlm_jax.data import sources, split
from mlm_jax.errors import ConfigError, DataError

PIP = "pip install 'mlm_jax[hf_data]'"
_ARROW_BATCH = 1024  # rows per Arrow batch of a stream; skipped whole when not needed
_STREAM_FILES = 64   # shards of a streamed save_to_disk dataset (contiguous row ranges)
_SHARD_BITS = 12     # streamed record id = position << 24 | (shards - 1) << 12 | shard
_SHARD_MASK = (1 << _SHARD_BITS) - 1
_SPLITS = {'train': split.TRAIN, 'eval': split.EVAL, 'test': split.TEST}
assert 1 << _SHARD_BITS == data_config.MAX_STREAM_SHARDS


def import_datasets():
  """The `datasets` package, or a ConfigError saying how to install it."""
  try:
    import datasets  # optional: only a source='hf' run needs it
  except ImportError:
    raise ConfigError('data.source', f"source='hf' needs the datasets package: {PIP}") from None
  datasets.disable_progress_bars()  # a bar per Arrow file would drown the training log
  return datasets


def _saved(path: str) -> bool:
  """Whether `path` is a save_to_disk directory (DatasetDict or Dataset)."""
  try:
    p = epath.Path(path)
    return (p / 'dataset_dict.json').exists() or (p / 'state.json').exists()
  except Exception:  # a hub name is no path; an fsspec error means no saved dataset either
    return False


def load(config, hf_split: str, field: str, streaming: bool):
  """The Dataset (IterableDataset when streaming) of split `hf_split`; `field` names it in errors."""
  d = config.data
  lib = import_datasets()
  path = data_config.expand_path(d.hf_path)
  try:
    if _saved(path):
      obj = lib.load_from_disk(path)
      if isinstance(obj, lib.DatasetDict):
        if hf_split not in obj:
          raise ConfigError(field, f'{hf_split!r} is not a split of {path} (it has {sorted(obj)})')
        obj = obj[hf_split]
      elif hf_split != 'train':
        raise ConfigError(field, f'{path} holds one Dataset, not a DatasetDict: it has no '
                          f'{hf_split!r} split' + (" (leave data.hf_split='train')"
                                                   if field == 'data.hf_split' else
                                                   "; set '' to carve eval out of it by hash"))
      return obj.to_iterable_dataset(min(len(obj), _STREAM_FILES) or 1) if streaming else obj
    files = sources.expand_globs(d.hf_data_files, 'hf_data_files') if d.hf_data_files else None
    return lib.load_dataset(path, d.hf_name or None, data_files=files, split=hf_split,
                            streaming=streaming)
  except (ConfigError, DataError):
    raise
  except ValueError as e:
    if 'split' in str(e).lower():
      raise ConfigError(field, f'{hf_split!r}: {_first_line(e)}') from None
    raise DataError(f'data.hf_path={d.hf_path!r}: cannot load ({_first_line(e)})') from None
  except Exception as e:  # datasets raises many types for a missing dataset, file or network
    raise DataError(f'data.hf_path={d.hf_path!r}: cannot load ({type(e).__name__}: '
                    f'{_first_line(e)})') from None


def _first_line(e) -> str:
  return (str(e).splitlines() or [''])[0][:200]


def _kind(feature) -> str | None:
  """'text' (strings or bytes), 'ids' (lists of ints), 'int' or None of a `datasets` feature."""
  dtype = getattr(feature, 'dtype', None)  # Value and ClassLabel
  if isinstance(dtype, str):
    if dtype in ('string', 'large_string', 'binary', 'large_binary'):
      return 'text'
    return 'int' if dtype.startswith(('int', 'uint')) else None
  inner = getattr(feature, 'feature', None)  # List, LargeList, Sequence
  return 'ids' if inner is not None and _kind(inner) == 'int' else None


def _columns(features, name, text_field, feature_names, optional=()) -> list[str] | None:
  """The columns to read (None: the schema is unknown), after checking their types."""
  if features is None:
    return None
  have = ', '.join(features)
  if text_field not in features:
    raise ConfigError('data.text_field', f'{name} has no column {text_field!r} (it has {have})')
  if _kind(features[text_field]) not in ('text', 'ids'):
    raise ConfigError('data.text_field', f'{name}: column {text_field!r} is '
                      f'{features[text_field]}, not text or a list of token ids')
  for f in feature_names:
    if f not in features:
      raise ConfigError('model.extra_embeddings', f'{name} has no column {f!r} for the extra '
                        f'embedding {f!r} (it has {have})')
    if _kind(features[f]) not in ('int', 'ids'):
      raise ConfigError('model.extra_embeddings', f'{name}: column {f!r} is {features[f]}, not '
                        'an int or a list of ints per record')
  wanted = [text_field, *feature_names, *optional]
  return [c for c in dict.fromkeys(wanted) if c in features]


def _text_kind(features, text_field) -> str | None:
  return None if features is None else _kind(features[text_field])


def _present(row: dict) -> dict:
  """A row without its nulls: a null (e.g. a JSON line without the key) is a missing field."""
  return {k: v for k, v in row.items() if v is not None}


class HfSource:
  """A `datasets.Dataset`: Arrow, memory-mapped, read by record index like TFDS."""

  def __init__(self, ds, name, text_field, feature_names, key_fields=(), limit=0,
               invalid_utf8='replace'):
    self.name, self.text_field, self.feature_names = name, text_field, tuple(feature_names)
    self.invalid_utf8 = invalid_utf8
    self._features = ds.features
    self._ds = ds.select_columns(_columns(ds.features, name, text_field, self.feature_names,
                                          key_fields))
    self._kind = _text_kind(ds.features, text_field)
    self.n = min(len(ds), limit) if limit else len(ds)

  def __len__(self):
    return self.n

  def where(self, i):
    return f'{self.name} record {i}'

  @property
  def kind(self) -> str:
    if self._kind is None:
      self._kind = sources.first_kind(self)
    return self._kind

  def objects(self, ids_N, counts):
    """(record id, row dict without nulls) of each requested record."""
    del counts
    ids = np.asarray(ids_N).tolist()
    return zip(ids, map(_present, self._ds.__getitems__(ids) if ids else []))

  def read(self, ids_N, counts) -> sources.Records:
    return sources.records_from_objects(self.objects(ids_N, counts), self.text_field,
                                        self.feature_names, self.kind, self.invalid_utf8, counts)

  def split_keys(self, key_field, stratify_field):
    for field, value in (('data.split_key', key_field), ('data.stratify_field', stratify_field)):
      if value and value not in self._features:
        raise ConfigError(field, f'{self.name} has no column {value!r} (it has '
                          f'{", ".join(self._features)})')
    return sources.keys_from_objects(self, key_field, stratify_field)


class HfStreams:
  """The splits of a streamed dataset: the pipeline asks `split(which)` for each (a stream is
  carved record by record, not by a list of record ids)."""

  streaming = True

  def __init__(self, config):
    self.config = config

  def split(self, which: str) -> 'HfStream':
    """The stream of split `which` ('train', 'eval' or 'test'), as pipeline.split_records cuts it."""
    d = self.config.data
    feature_names = list(self.config.model.extra_embeddings.keys())
    args = dict(text_field=d.text_field, feature_names=feature_names, seed=self.config.seed,
                limit=d.max_records, invalid_utf8=d.invalid_utf8, endless=which == 'train')
    if which == 'eval' and d.hf_eval_split:
      return HfStream(load(self.config, d.hf_eval_split, 'data.hf_eval_split', True),
                      f'hf:{d.hf_path}[{d.hf_eval_split}]', **args)
    eval_fraction = 0.0 if d.hf_eval_split else d.eval_fraction
    if which == 'eval' and not eval_fraction:
      raise DataError('no eval data: set data.hf_eval_split or data.eval_fraction > 0')
    carve = None
    if eval_fraction or d.test_fraction:
      carve = (which, eval_fraction, d.test_fraction, d.split_key or d.text_field)
    name = f'hf:{d.hf_path}[{d.hf_split}]' + (f' ({which} part)' if carve else '')
    stream = HfStream(load(self.config, d.hf_split, 'data.hf_split', True), name, carve=carve,
                      **args)
    if which == 'train':
      logging.info('%s: streamed from %d dataset shards, read in a seeded order each epoch, the '
                   'records of each in file order (no record-level shuffle); a resume re-reads '
                   'the stream up to its position', name, stream.files)
    return stream


def encode_ids(pos_N, shard: int, shards: int) -> np.ndarray:
  """Record ids of positions pos_N of input shard `shard` of `shards` (see the module doc)."""
  pos_N = np.asarray(pos_N, np.int64)
  return (pos_N << (2 * _SHARD_BITS)) | ((shards - 1) << _SHARD_BITS) | shard


def decode_ids(ids_N) -> tuple[np.ndarray, int, int]:
  """(positions, shard, shards) of record ids that encode_ids made for one input shard."""
  ids_N = np.asarray(ids_N, np.int64)
  return ids_N >> (2 * _SHARD_BITS), int(ids_N[0] & _SHARD_MASK), int(
      (ids_N[0] >> _SHARD_BITS) & _SHARD_MASK) + 1


class StreamOrder:
  """The record order of one input shard of a stream (in place of the pipeline's per-epoch
  permutation): stream position p of this shard is record id encode_ids(p)."""

  def __init__(self, shard, shards, epoch_records):
    self.shard, self.shards, self.epoch_records = shard, shards, epoch_records

  def take(self, start, count):
    """(record ids, epochs) of stream positions [start, start + count); a position never repeats,
    so the epoch (unknown before reading) is not needed to make each record's masks its own."""
    return (encode_ids(np.arange(start, start + count), self.shard, self.shards),
            np.zeros(count, np.int64))


class HfStream:
  """One split of a streamed dataset (an IterableDataset), read by input shard and position."""

  streaming = True

  def __init__(self, ds, name, text_field, feature_names, seed, carve=None, limit=0,
               invalid_utf8='replace', endless=True):
    self.name, self.text_field, self.feature_names = name, text_field, tuple(feature_names)
    self.seed, self.carve, self.endless, self.invalid_utf8 = seed, carve, endless, invalid_utf8
    key = carve[3] if carve else None
    columns = _columns(ds.features, name, text_field, self.feature_names, [key] if key else [])
    if key and ds.features is not None and key not in ds.features:
      raise ConfigError('data.split_key', f'{name} has no column {key!r}')
    self._ds = ds if columns is None else ds.select_columns(columns)
    self._kind = _text_kind(ds.features, text_field)
    self.files = ds.num_shards
    if limit:  # the first `limit` records, as one shard
      self._ds, self.files = self._ds.take(limit), 1
    self.kept = {}  # dataset shard -> records it gives this split, learnt while reading
    self._init_local()

  def _init_local(self):
    self._cursors, self._lock, self._block = {}, threading.Lock(), None
    self._recent = collections.deque(maxlen=8)  # (shard, first position, locations) of blocks

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items()
            if k not in ('_cursors', '_lock', '_block', '_recent')}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_local()

  def order(self, shard: int, shards: int) -> StreamOrder:
    """The order of input shard `shard` of `shards` (the pipeline's train shards)."""
    if shards > data_config.MAX_STREAM_SHARDS:
      raise ConfigError('data.num_shards', f'at most {data_config.MAX_STREAM_SHARDS} input '
                        f'shards with data.hf_streaming, got {shards}')
    if self.files < shards and shard == 0:
      logging.warning('%s: %d dataset shards for %d input shards: every input shard reads all '
                      'records and keeps every %d-th (more files make streaming cheaper)',
                      self.name, self.files, shards, shards)
    return StreamOrder(shard, shards, 1 << 40)  # unknown length: no "every record empty" check

  def where(self, i):
    pos_N, shard, shards = decode_ids([i])
    pos = int(pos_N[0])
    for block_shard, first, locations in self._recent:  # blocks read lately know their rows
      if block_shard == (shard, shards) and first <= pos < first + len(locations):
        epoch, h, row = locations[pos - first]
        return f'{self.name} shard {h} row {row} (epoch {epoch})'
    return f'{self.name} position {pos} of input shard {shard}/{shards}'

  @property
  def kind(self) -> str:
    """'text' or 'ids': the schema's, else what the first well-formed record holds."""
    if self._kind is None:
      self._kind = 'text'
      for _, row in _Cursor(self, 0, 1, endless=False).rows():
        value = _present(row).get(self.text_field)
        kind = sources.text_kind(value)
        if kind == 'text' or (kind == 'ids' and len(value)):
          self._kind = kind
          break
    return self._kind

  def keep(self, table) -> np.ndarray | None:
    """Which rows of an Arrow table belong to this split (None: all)."""
    if self.carve is None:
      return None
    which, eval_fraction, test_fraction, key = self.carve
    values = table.column(key).to_pylist() if key in table.column_names else [None] * len(table)
    hashes = np.zeros(len(table), np.uint64)
    for r, v in enumerate(values):  # keys_from_objects' hash: the split of the same data by index
      if v is None:  # no key: the whole record decides, as by index
        v = _present(table.slice(r, 1).to_pylist()[0])
      hashes[r] = sources._hash_value(v)  # pylint: disable=protected-access
    return split.assign(hashes, eval_fraction, test_fraction) == _SPLITS[which]

  def tables(self, h: int):
    """Arrow tables of dataset shard h, in order."""
    ds = self._ds if self.files == 1 else self._ds.shard(num_shards=self.files, index=h,
                                                         contiguous=True)
    return ds.with_format('arrow').iter(batch_size=_ARROW_BATCH)

  def _rows(self, ids_N):
    pos_N, shard, shards = decode_ids(ids_N)
    if len(pos_N) and not (np.diff(pos_N) == 1).all():
      raise ValueError('a stream reads consecutive positions only')
    with self._lock:
      if self._block is not None and self._block[0] == int(ids_N[0]) and len(
          self._block[1]) == len(ids_N):
        got, self._block = self._block[1], None
      else:
        cursor = self._cursors.get((shard, shards))
        if cursor is None:
          cursor = self._cursors[(shard, shards)] = _Cursor(self, shard, shards, self.endless)
        got = cursor.read(int(pos_N[0]), len(pos_N))
      self._recent.append(((shard, shards), int(pos_N[0]), [loc for loc, _ in got]))
    return got

  def read(self, ids_N, counts) -> sources.Records:
    ids_N = np.asarray(ids_N, np.int64)
    got = self._rows(ids_N) if len(ids_N) else []
    if len(got) < len(ids_N):
      raise DataError(f'{self.name}: the stream ended before position '
                      f'{int(decode_ids(ids_N)[0][-1])}')
    objects = ((i, _present(row)) for i, (_, row) in zip(ids_N.tolist(), got))
    return sources.records_from_objects(objects, self.text_field, self.feature_names, self.kind,
                                        self.invalid_utf8, counts)

  def blocks(self, chunk: int):
    """Record ids of the whole split (one pass, in order), `chunk` at a time: for eval."""
    pos = 0
    while True:
      ids = encode_ids(np.arange(pos, pos + chunk), 0, 1)
      with self._lock:
        cursor = self._cursors.setdefault((0, 1, 'blocks'), _Cursor(self, 0, 1, endless=False))
        got = cursor.read(pos, chunk)
        self._block = (int(ids[0]), got)
      if not got:
        return
      yield ids[:len(got)]
      pos += len(got)

  def split_keys(self, key_field, stratify_field):
    raise DataError(f'{self.name}: a stream is split record by record (HfStreams.split)')


class _Cursor:
  """One input shard's records of a stream from any position on: forward moves skip whole Arrow
  batches (and whole dataset shards whose record count is known); a move back starts over."""

  def __init__(self, stream: HfStream, shard: int, shards: int, endless: bool):
    self.stream, self.shard, self.shards, self.endless = stream, shard, shards, endless
    self.stride = stream.files < shards  # fewer dataset shards than input shards
    self._gen, self._table, self._low, self._target = None, None, 0, 0

  def _files(self, epoch):
    """Dataset shards of this input shard in `epoch`'s order (single pass: the dataset's order)."""
    n = self.stream.files
    mine = np.arange(n) if self.stride else np.arange(self.shard, n, self.shards)
    if not self.endless:
      return mine.tolist()
    # Stride: one order for every input shard, so the strides split each pass between them.
    seed = [self.stream.seed, epoch] if self.stride else [self.stream.seed, self.shard, epoch]
    return mine[np.random.default_rng(seed).permutation(len(mine))].tolist()

  def _passes(self):
    """(first position, [(epoch, shard, row)], Arrow table) of this input shard's records."""
    pos, epoch = 0, 0
    while True:
      first, j = pos, 0  # j: rows of this pass so far (the stride counts them)
      for h in self._files(epoch):
        known = None if self.stride else self.stream.kept.get(h)
        if known is not None and pos + known <= self._target:
          pos += known
          continue
        kept, row = 0, 0
        for table in self.stream.tables(h):
          n = len(table)
          keep = None
          if self.stride:
            keep = np.arange(j, j + n) % self.shards == self.shard
          carved = self.stream.keep(table)
          if carved is not None:
            keep = carved if keep is None else keep & carved
          idx = np.arange(n) if keep is None else np.flatnonzero(keep)
          if len(idx):
            yield pos, [(epoch, h, row + int(r)) for r in idx], (
                table if keep is None else table.take(idx))
          pos, kept, row, j = pos + len(idx), kept + len(idx), row + n, j + n
        if not self.stride:
          self.stream.kept[h] = kept
      if pos == first:
        raise DataError(f'{self.stream.name}: input shard {self.shard} of {self.shards} gets no '
                        'record (an empty dataset, or a split with none)')
      if not self.endless:
        return
      epoch += 1

  def read(self, start: int, n: int) -> list:
    """[(location, row)] of positions [start, start + n); fewer at the end of a single pass."""
    if self._gen is None or start < self._low:
      self._gen, self._table, self._low = self._passes(), None, 0
    self._target = start
    out, want = [], start
    while want < start + n:
      if self._table is None:
        self._table = next(self._gen, None)
        if self._table is None:
          break
        self._low = self._table[0]
      first, locations, table = self._table
      end = first + len(table)
      if end > want:
        a, b = want - first, min(len(table), start + n - first)
        out += zip(locations[a:b], table.slice(a, b - a).to_pylist())
        want = first + b
      if want >= end:
        self._table, self._low = None, end
    return out

  def rows(self):
    """Every (location, row) of one pass, in order."""
    pos = 0
    while True:
      got = self.read(pos, _ARROW_BATCH)
      if not got:
        return
      yield from got
      pos += len(got)


def open_source(config, split_name: str):
  """Train: the dataset's hf_split; eval: hf_eval_split, None when empty (carved by hash).
  Streamed, both are an `HfStreams`, which gives the pipeline every split."""
  d = config.data
  if d.hf_streaming:
    return HfStreams(config)
  hf_split = d.hf_split if split_name == 'train' else d.hf_eval_split
  if not hf_split:
    return None
  field = 'data.hf_split' if split_name == 'train' else 'data.hf_eval_split'
  key_fields = [f for f in (d.split_key, d.stratify_field) if f]
  return HfSource(load(config, hf_split, field, False), f'hf:{d.hf_path}[{hf_split}]', d.text_field,
                  list(config.model.extra_embeddings.keys()), key_fields, d.max_records,
                  d.invalid_utf8)
