"""The grain pipeline: split -> per-epoch shuffle -> chunks (workers) -> rebatch -> batches.

A grain element is a chunk of `data.chunk_records` records turned into rows (read, tokenized,
windowed, packed, masked) by `ChunkBuilder`; chunk k is a pure function of k, so worker processes
(grain `mp_prefetch`) only change speed, never the batches. `BatchIterator` (a grain
DatasetIterator) cuts the rows into batches; its state is just {next chunk, row in it}.
"""
import ctypes
import sys

import grain
import numpy as np
from absl import flags, logging

from mlm_jax.data import config as data_config
from mlm_jax.data import registry, rng, sources, split, stats
from mlm_jax.data.chunks import ChunkBuilder, widen
from mlm_jax.data.tokenizers import check_vocab_size
from mlm_jax.errors import ConfigError, DataError

BATCH_KEYS = ('input_ids', 'segment_ids', 'positions', 'token_type_ids', 'mlm_positions',
              'mlm_targets', 'mlm_weights')


def split_records(config, which: str):
  """(source, record indices) of split `which` ('train', 'eval' or 'test'), int32 if they fit;
  (stream, None) for a streamed source, which carves its splits record by record itself."""
  d = config.data
  own_eval = registry.open_source(config, 'eval')
  if getattr(own_eval, 'streaming', False):  # see data/hf_source.py
    return own_eval.split(which), None
  if which == 'eval' and own_eval is not None:
    return own_eval, _nonempty(own_eval, np.arange(len(own_eval), dtype=np.int64), which)
  eval_fraction = d.eval_fraction if own_eval is None else 0.0  # carve eval only without its own
  if which == 'eval' and not eval_fraction:
    raise DataError('no eval data: set data.eval_files/tfds_eval_split or data.eval_fraction > 0')
  train = registry.open_source(config, 'train')
  if not eval_fraction and not d.test_fraction:
    return train, _nonempty(train, np.arange(len(train), dtype=np.int64), which)
  hashes, strata = train.split_keys(d.split_key, d.stratify_field)
  assignment = split.assign(hashes[:len(train)], eval_fraction, d.test_fraction,
                            None if strata is None else strata[:len(train)])
  return train, _nonempty(train, split.select(assignment, which), which)


def build_tokenizer(config):
  """The tokenizer config.data describes (see registry.py), checked against model.vocab_size."""
  return registry.build_tokenizer(config, lambda: split_records(config, 'train'))


def _nonempty(source, ids, which):
  if len(ids) and ids[-1] < 2**31:
    ids = ids.astype(np.int32)  # O(records) memory: half of it
  if not len(ids):
    raise DataError(f'{source.name}: the {which} split has no records (empty corpus, or a '
                    f'fraction too small for it)')
  return ids


def _worker_init(index, count):
  """Keep freed arrays in the worker's heap: every chunk allocates and frees the same large arrays,
  and glibc's default of returning them to the OS makes page faults ~40% of the work."""
  del index, count
  try:
    libc = ctypes.CDLL('libc.so.6')
  except OSError:
    return
  libc.mallopt(-3, 32 << 20)   # M_MMAP_THRESHOLD (its maximum)
  libc.mallopt(-1, 1 << 30)    # M_TRIM_THRESHOLD
  libc.mallopt(-2, 64 << 20)   # M_TOP_PAD


class _Epochs:
  """Record order: a fresh seeded permutation of the shard each epoch (O(records) ints)."""

  def __init__(self, ids, seed):
    self.ids, self.seed, self._perms = ids, seed, {}

  def __getstate__(self):
    return {'ids': self.ids, 'seed': self.seed, '_perms': {}}

  @property
  def epoch_records(self):
    return len(self.ids)

  def take(self, start, count):
    """(record ids, epochs) of stream positions [start, start + count)."""
    n = len(self.ids)
    pos = np.arange(start, start + count, dtype=np.int64)
    epoch_N, within = np.divmod(pos, n)
    out = np.empty(count, np.int64)
    for e in np.unique(epoch_N).tolist():
      if e not in self._perms:
        if len(self._perms) >= 2:
          self._perms.pop(min(self._perms))
        self._perms[e] = np.random.default_rng([self.seed, e]).permutation(
            np.arange(n, dtype=np.int32 if n < 2**31 else np.int64))
      sel = epoch_N == e
      out[sel] = self.ids[self._perms[e][within[sel]]]
    return out, epoch_N


class _TrainChunks(grain.MapDataset):
  """Endless: element j is chunk first+j, covering stream positions [k*C, (k+1)*C) of the
  concatenated epoch orders."""

  def __init__(self, builder, epochs, chunk, first=0):
    super().__init__()
    self.builder, self.epochs, self.chunk, self.first = builder, epochs, chunk, first

  def __len__(self):
    return sys.maxsize - self.first

  def __getitem__(self, j):
    if isinstance(j, slice):
      return self.slice(j)
    record_N, epoch_N = self.epochs.take((self.first + j) * self.chunk, self.chunk)
    return self.builder(record_N, epoch_N)


class BatchIterator(grain.DatasetIterator):
  """Cuts the stream of chunk rows into batches of b rows.

  The state is {'chunk', 'row'}: the next row to emit. It does not depend on the worker count, so
  a run may resume with a different data.num_workers. `stats` counts bad input and padding.
  """

  _LOG_EVERY = 5000  # batches between absl INFO lines with all counters

  def __init__(self, make_chunks, batch_size, stats_, epoch_records):
    super().__init__()
    self._make_chunks, self._b, self.stats = make_chunks, batch_size, stats_
    self._chunk, self._row = 0, 0  # position of the next row
    self._rows, self._inner = None, None
    # Records read since the last chunk that gave rows: two epochs' worth means none ever will.
    self._epoch_records, self._dry = epoch_records, 0

  def _next_rows(self):
    if self._inner is None:
      self._inner = iter(self._make_chunks(self._chunk))
    rows = next(self._inner)
    vec = rows.pop('_stats')
    self.stats.add_chunk(vec, rows.pop('_bad'))
    self._dry = 0 if len(rows['input_ids']) else self._dry + int(vec[0])  # vec[0]: records
    if self._dry >= 2 * self._epoch_records:
      raise DataError(f'{getattr(self.stats.source, "name", "")}: no record of the {self.stats.name} '
                      f'split gives any token (all bad or empty; data stats: '
                      f'bad_records={self.stats.counts["bad_records"]}, '
                      f'empty_records={self.stats.counts["empty_records"]})')
    return rows

  @property
  def batch_size(self) -> int:
    return self._b

  def __next__(self):
    return self.next_rows(self._b)

  def next_rows(self, b):
    """The next `b` rows: a batch of another size than the iterator's own (the batch-size ramp
    takes part of a batch; the rows after it come next, so the position is just as exact)."""
    self._assert_not_closed()
    parts, need = [], b
    while need:
      if self._rows is None:
        self._rows = self._next_rows()
      n = len(self._rows['input_ids'])
      take = min(need, n - self._row)
      if take:
        parts.append({k: v[self._row:self._row + take] for k, v in self._rows.items()})
      need -= take
      self._row += take
      if self._row == n:
        self._rows, self._chunk, self._row = None, self._chunk + 1, 0
    batch = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts])
                                              for k in parts[0]}
    self.stats.add_batch(batch['segment_ids'])
    if self.stats.counts['rows'] % (self._LOG_EVERY * self._b) < b:
      self.stats.log()
    return widen(batch)

  def get_state(self):
    return {'chunk': int(self._chunk), 'row': int(self._row)}

  def set_state(self, state):
    self._close_inner()
    self._chunk, self._row = int(state['chunk']), int(state['row'])

  def _close_inner(self):
    if self._inner is not None:
      self._inner.close()
    self._inner, self._rows = None, None

  def close(self):
    self._close_inner()
    super().close()


def _local_batch(config, process_count):
  b, rem = divmod(config.train.batch_size, process_count)
  if rem or not b:
    raise ConfigError('train.batch_size', f'{config.train.batch_size} is not divisible by the '
                      f'{process_count} processes')
  return b


def _builder(config, tokenizer, source, stream):
  data_config.validate(config)
  check_vocab_size(config, tokenizer)
  sources.check_tokenizer(source, tokenizer)
  return ChunkBuilder(config, tokenizer, source, config.seed, stream,
                      data_config.max_predictions(config))


def num_shards(config, process_count: int) -> int:
  """Logical input shards: data.num_shards, or one per process."""
  n = config.data.num_shards or process_count
  if n % process_count:
    raise ConfigError('data.num_shards', f'{n} shards cannot be split evenly over '
                      f'{process_count} processes')
  if config.train.batch_size % n:
    raise ConfigError('data.num_shards', f'{n} does not divide train.batch_size '
                      f'{config.train.batch_size}')
  if config.train.get('batch_ramp_steps'):  # validated: then grad_accum_steps is a count
    micro = config.train.batch_size // config.train.grad_accum_steps
    if micro % n:
      raise ConfigError('data.num_shards', f'{n} does not divide the micro-batch of {micro} rows: '
                        'with train.batch_ramp_steps every shard gives whole micro-batches')
  return n


def train_iterator(config, tokenizer, *, process_index=0, process_count=1):
  """Endless, checkpointable grain iterator over this process's train batches (see API.md).

  The train split is cut into `num_shards` logical shards (record i goes to shard i % S), each
  with its own record order and stream; a global batch is the concatenation of every shard's next
  B/S rows, in shard order. A process owns a contiguous range of shards, so the global batch does
  not depend on how many processes share the work. The iterator's `stats` (a `Stats`) counts bad
  input and padding.
  """
  d = config.data
  shards = num_shards(config, process_count)
  source, ids = split_records(config, 'train')
  builder = _builder(config, tokenizer, source, rng.TRAIN)
  _local_batch(config, process_count)
  st = stats.Stats('train', source, d.max_bad_fraction)
  st.counts['empty_lines'] = getattr(getattr(source, 'fileset', None), 'empty_lines', 0)
  per_process = shards // process_count
  mine = range(process_index * per_process, (process_index + 1) * per_process)
  logging.info('data/train: %s records in %d shards (shards %d-%d on process %d of %d), %s',
               'streamed' if ids is None else len(ids), shards, mine[0], mine[-1], process_index,
               process_count, source.name)

  def shard_iterator(shard):
    if ids is None:  # a stream orders its records itself (positions of an endless sequence)
      epochs = source.order(shard, shards)
    else:
      epochs = _Epochs(_nonempty(source, ids[shard::shards], f'train (shard {shard})'),
                       config.seed if shards == 1 else [config.seed, shard])

    def make_chunks(first):
      ds = _TrainChunks(builder, epochs, d.chunk_records, first)
      ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if d.prefetch_chunks else 0,
                                                prefetch_buffer_size=d.prefetch_chunks))
      if d.num_workers:
        if not flags.FLAGS.is_parsed():  # outside an absl app (tests, notebooks) grain needs defaults
          flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=d.num_workers, per_worker_buffer_size=d.worker_buffer_size),
            worker_init_fn=_worker_init)
      return ds

    return BatchIterator(make_chunks, config.train.batch_size // shards, st, epochs.epoch_records)

  return ShardedIterator({s: shard_iterator(s) for s in mine}, shards, st)


class ShardedIterator(grain.DatasetIterator):
  """This process's shards, side by side: each `next` is the concatenation of their next rows.

  The state maps shard number -> that shard's {'chunk', 'row'}; `set_state` takes a state with
  more shards (e.g. gathered from every process) and picks its own, so a checkpoint written by one
  process layout resumes under another.
  """

  def __init__(self, shards: dict, num_shards: int, stats_):
    super().__init__()
    self._shards, self.num_shards, self.stats = shards, num_shards, stats_

  def __next__(self):
    return self._joined([next(it) for it in self._shards.values()])

  def next_part(self, k: int, parts: int):
    """The next batch cut to `k` of its `parts` equal parts (the batch-size ramp: k of the
    grad_accum_steps micro-batches): every shard gives k/parts of its rows, so the batch is still
    every shard's rows in shard order, whatever the process layout."""
    return self._joined([it.next_rows(it.batch_size * k // parts) for it in self._shards.values()])

  @staticmethod
  def _joined(parts):
    if len(parts) == 1:
      return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self):
    return {'num_shards': self.num_shards,
            'shards': {str(s): it.get_state() for s, it in self._shards.items()}}

  def set_state(self, state):
    if state.get('num_shards') != self.num_shards:
      raise ConfigError('data.num_shards', f'the saved input state has {state.get("num_shards")} '
                        f'shards, this run {self.num_shards}')
    for s, it in self._shards.items():
      it.set_state(state['shards'][str(s)])

  def close(self):
    for it in self._shards.values():
      it.close()
    super().close()


def eval_batches(config, tokenizer, *, process_index=0, process_count=1, max_batches=None,
                 split_name='eval', stats_=None):
  """Yields this process's eval batches: fixed masks, corpus order, static shapes.

  Every process walks the whole split and takes its slice of each global batch, so all processes
  yield the same number of batches. The last batch is filled with padding rows (zero weights).
  """
  source, ids = split_records(config, split_name)
  builder = _builder(config, tokenizer, source, rng.EVAL)
  b = _local_batch(config, process_count)
  B, chunk = b * process_count, config.data.chunk_records
  st = stats_ if stats_ is not None else stats.Stats(split_name, source,
                                                     config.data.max_bad_fraction)
  blocks = source.blocks(chunk) if ids is None else (ids[lo:lo + chunk]
                                                     for lo in range(0, len(ids), chunk))
  pending, count = [], 0
  emitted = 0
  while max_batches is None or emitted < max_batches:
    while count < B and (block := next(blocks, None)) is not None:
      rows = builder(block, np.zeros(len(block), np.int64))
      st.add_chunk(rows.pop('_stats'), rows.pop('_bad'))
      pending.append(rows)
      count += len(rows['input_ids'])
    if not count:
      if not emitted and (max_batches is None or max_batches > 0):
        raise DataError(f'{source.name}: no record of the {split_name} split gives any token '
                        f'({st.counts["records"]} records; data stats: '
                        f'bad_records={st.counts["bad_records"]}, '
                        f'empty_records={st.counts["empty_records"]})')
      return
    batch = {k: np.concatenate([r[k] for r in pending]) for k in pending[0]}
    rest = {k: v[B:] for k, v in batch.items()}
    batch = {k: v[:B] for k, v in batch.items()}
    pending, count = ([rest], len(rest['input_ids'])) if len(rest['input_ids']) else ([], 0)
    n = len(batch['input_ids'])
    if n < B:  # static shapes: pad with rows that carry no tokens and no predictions
      batch = {k: np.concatenate([v, _padding_rows(v, B - n, k, tokenizer)])
               for k, v in batch.items()}
    local = {k: v[process_index * b:(process_index + 1) * b] for k, v in batch.items()}
    st.add_batch(local['segment_ids'])
    emitted += 1
    yield widen(local)


def _padding_rows(v, n, key, tokenizer):
  fill = tokenizer.pad_id if key == 'input_ids' else 0
  return np.full((n,) + v.shape[1:], fill, v.dtype)
