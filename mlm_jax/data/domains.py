"""Domain names as MLM records (DomainBERT): characters of the name, plus its public suffix as an id.

A name is split at its public suffix with the `publicsuffixlist` package (bundled list, ICANN
section only, no network): 'www.example.co.uk' -> suffix 'co.uk', registrable label 'example',
host 'www.example'. The record's text is the label (data.domain_part='registrable') or the host
('host'); the suffix becomes a per-record id in feature 'tld', broadcast over the record's tokens.

TLD ids: 0 = padding, 1 = any suffix outside the vocabulary ('other'), 2.. = the
data.tld_vocab_size - 2 most frequent suffixes of the training split (ties by name). The vocabulary
lives in the tokenizer (`DomainTokenizer`), so `tokenizer.save(dir)` / `load_tokenizer(dir)` keep
the ids of a run for predict and evaluate.

Input: text files with one name per line, or CSV files (data.domain_column: a header name, or a
0-based column number for files without a header). Lines that are not a host name or have no known
suffix (e.g. 'localhost', 'co.uk' alone) are bad records: skipped and counted (data.bad_records).
"""
import csv
import functools
import io
import re

import numpy as np
from absl import logging
from etils import epath

from mlm_jax.data import config as data_config
from mlm_jax.data import filereader, sources, textindex
from mlm_jax.data.tokenizers import CharTokenizer, write_meta
from mlm_jax.errors import ConfigError, DataError

ALPHABET = data_config.DOMAIN_ALPHABET  # a-z 0-9 '-' '.'
PAD_TLD, OTHER_TLD = 0, 1
TLD_FILE = 'tld_vocab.txt'
_NAME = re.compile(r'[a-z0-9-]+(\.[a-z0-9-]+)*')


@functools.lru_cache(maxsize=1)
def _psl():
  from publicsuffixlist import PublicSuffixList
  return PublicSuffixList(only_icann=True, accept_unknown=False)


def psl_version() -> str:
  try:
    from importlib.metadata import version
    return version('publicsuffixlist')
  except Exception:  # noqa: BLE001 -- only part of a cache key
    return 'unknown'


def normalize(name: str) -> str | None:
  """Lower-case ASCII (IDNA/punycode) form of a host name, or None if it is not one."""
  name = name.strip().lower()
  if name.endswith('.'):
    name = name[:-1]  # fully qualified form
  if '://' in name:  # a URL: keep its host
    name = name.split('://', 1)[1].split('/', 1)[0].split(':', 1)[0]
  if not name.isascii():
    try:
      name = name.encode('idna').decode('ascii')
    except UnicodeError:
      return None
  if not _NAME.fullmatch(name) or len(name) > 253 or any(len(p) > 63 for p in name.split('.')):
    return None
  return name


def split_name(name: str) -> tuple[str, str] | None:
  """(part left of the public suffix, suffix) of a host name, or None (not a name, no known
  suffix, or nothing left of the suffix)."""
  name = normalize(name)
  if name is None:
    return None
  suffix = _psl().publicsuffix(name)
  if suffix is None or len(suffix) >= len(name):
    return None
  return name[:-len(suffix) - 1], suffix


def record_text(host: str, part: str) -> str:
  """The text the model reads: 'registrable' = the label before the suffix, 'host' = all of it."""
  return host.rsplit('.', 1)[-1] if part == 'registrable' else host


def registrable_domain(name: str) -> str | None:
  """eTLD+1 ('www.example.co.uk' -> 'example.co.uk'), or None."""
  parts = split_name(name)
  return None if parts is None else f'{record_text(parts[0], "registrable")}.{parts[1]}'


def _column_index(header: str, column: str, path: str) -> int:
  if column.isdigit():
    return int(column)
  names = [c.strip() for c in next(csv.reader([header]))]
  if column not in names:
    raise DataError(f'{path}: CSV header has no column {column!r} (data.domain_column); '
                    f'it has {names[:10]}')
  return names.index(column)


class DomainSource:
  """Domain names of text/CSV files. `read` needs the TLD vocabulary: the pipeline binds the
  tokenizer (`with_tokenizer`) before reading."""

  def __init__(self, files, cache, part, column, limit=0, with_tld=True):
    self.fileset = filereader.FileSet(files, 'line', cache, limit)
    self.files, self.cache, self.part, self.column = files, cache, part, column
    self.with_tld = with_tld
    self.name = ','.join(files)
    self._tld_ids = None  # suffix -> id, from the tokenizer
    self._parsed = None
    # CSV with a header: each file's first record is the header, never data.
    self._header_N = self.fileset.bounds[:-1] if column and not column.isdigit() else np.zeros(
        0, np.int64)
    self._columns = None

  def __len__(self):
    return self.fileset.n

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != '_parsed'}

  def __setstate__(self, state):
    self.__dict__.update(state, _parsed=None)

  def with_tokenizer(self, tokenizer):
    if not isinstance(tokenizer, DomainTokenizer):
      raise ConfigError('data.source', "'domains' needs the domain tokenizer (data.tokenizer='char' "
                        'builds one with the TLD vocabulary)')
    self._tld_ids = tokenizer.tld_index
    return self

  def _column_of(self, f):
    if self._columns is None:
      self._columns = {}
    if f not in self._columns:
      if not self.column:
        self._columns[f] = None
      else:
        header = b'' if self.column.isdigit() else self.fileset.read(
            np.array([self.fileset.bounds[f]]))[0]
        self._columns[f] = _column_index(header.decode('utf-8', 'replace'), self.column,
                                         self.files[f])
    return self._columns[f]

  def _names(self, ids_N, raw):
    """(position, raw name) of the data records among ids_N; headers dropped."""
    f_N, _ = self.fileset.locate(np.asarray(ids_N, np.int64))
    header = np.isin(ids_N, self._header_N)
    out = []
    for k, (f, b) in enumerate(zip(f_N.tolist(), raw)):
      if header[k]:
        continue
      s = b.decode('utf-8', 'replace')
      col = self._column_of(f)
      if col is not None:
        row = next(csv.reader([s]), [])
        s = row[col] if col < len(row) else ''
      out.append((k, s))
    return out

  def read(self, ids_N, counts):
    if self.with_tld and self._tld_ids is None:
      raise DataError('DomainSource.read before with_tokenizer: the TLD vocabulary is unknown')
    keep, texts, tlds, bad = [], [], [], []
    for k, s in self._names(ids_N, self.fileset.read(ids_N)):
      parts = split_name(s)
      if parts is None:
        shown = ' '.join(repr(s).split())[:60]
        bad.append((k, f'not a host name with a known public suffix: {shown}'))
        continue
      keep.append(k)
      texts.append(record_text(parts[0], self.part))
      if self.with_tld:
        tlds.append(self._tld_ids.get(parts[1], OTHER_TLD))
    return sources.Records(keep, texts=texts, features={'tld': tlds} if self.with_tld else {},
                           bad=bad)

  def where(self, i):
    return self.fileset.where(i)

  def parsed(self):
    """(hash_N uint64 of text|suffix, suffix_N int32 code or -1 if invalid, suffix names).
    One pass over the files, cached on disk per file (keyed by path, size, mtime, part, column)."""
    if self._parsed is None:
      hashes, codes, names, index = [], [], [], {}
      for f, path in enumerate(self.files):
        key = f'line|{self.part}|{self.column}|psl{psl_version()}|v2'
        z = textindex._cached(path, key, self.cache, 'domains',
                              functools.partial(self._parse_file, f))
        local = np.array([index.setdefault(str(n), len(index)) for n in z['names']], np.int32)
        hashes.append(z['hash'])
        codes.append(np.where(z['suffix'] >= 0, local[np.maximum(z['suffix'], 0)], -1)
                     if len(local) else z['suffix'])
      names = sorted(index, key=index.get)
      n = len(self)
      self._parsed = (np.concatenate(hashes)[:n], np.concatenate(codes)[:n].astype(np.int32),
                      names)
    return self._parsed

  def _parse_file(self, f):
    import hashlib
    lo, hi = int(self.fileset.bounds[f]), int(self.fileset.bounds[f + 1])
    logging.info('Parsing domain names of %s', self.files[f])
    hash_N = np.zeros(hi - lo, np.uint64)
    suffix_N = np.full(hi - lo, -1, np.int32)
    index = {}
    for start in range(lo, hi, 65536):
      ids = np.arange(start, min(hi, start + 65536))
      for k, s in self._names(ids, self.fileset.read(ids)):
        parts = split_name(s)
        # A bad line is dropped when read; hashing its text spreads such lines over the splits
        # like any other record (one hash for all would put every bad line in one split).
        key = (f'{record_text(parts[0], self.part)}|{parts[1]}' if parts else f'bad|{s}').encode()
        hash_N[start - lo + k] = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(),
                                                'little')
        if parts:
          suffix_N[start - lo + k] = index.setdefault(parts[1], len(index))
    names = np.array(sorted(index, key=index.get) or [''], dtype=str)[:len(index)]
    return {'hash': hash_N, 'suffix': suffix_N, 'names': names}

  def split_keys(self, key_field, stratify_field):
    """Split by the model's input (text and suffix: duplicates stay together), stratified by
    suffix when data.stratify_field='tld'. Invalid names form their own stratum."""
    del key_field
    hash_N, suffix_N, _ = self.parsed()
    return hash_N, (suffix_N.astype(np.int64) if stratify_field else None)


def tld_vocabulary(source, train_ids, tld_vocab_size: int) -> list[str]:
  """The tld_vocab_size - 2 most frequent suffixes of the records `train_ids` of `source` (a
  DomainSource), most frequent first (ties by name): deterministic for a given corpus and split."""
  _, suffix_N, names = source.parsed()
  s = suffix_N[train_ids]
  counts = np.bincount(s[s >= 0], minlength=len(names))
  order = sorted(range(len(names)), key=lambda i: (-counts[i], names[i]))
  return [names[i] for i in order if counts[i]][:tld_vocab_size - 2]


class DomainTokenizer(CharTokenizer):
  """The character tokenizer over the domain alphabet, carrying the run's TLD vocabulary
  (saved next to it as tld_vocab.txt: line i is the suffix with id i + 2)."""

  kind = 'domain'

  def __init__(self, alphabet: str, lowercase: bool, tlds: list[str]):
    super().__init__(alphabet, lowercase)
    self.tlds = list(tlds)
    self.tld_index = {t: i + 2 for i, t in enumerate(self.tlds)}

  @property
  def tld_vocab_size(self) -> int:
    return len(self.tlds) + 2

  def tld_ids(self, suffixes) -> np.ndarray:
    return np.array([self.tld_index.get(s, OTHER_TLD) for s in suffixes], np.int32)

  def tld_name(self, i: int) -> str:
    return '[PAD]' if i == PAD_TLD else '[OTHER]' if i == OTHER_TLD else self.tlds[i - 2]

  def fingerprint(self):
    return super().fingerprint() + '|' + str(hash_list(self.tlds))

  def save(self, directory):
    write_meta(directory, {'kind': self.kind, 'lowercase': self.lowercase,
                            'alphabet': self.alphabet, 'tld_vocab': TLD_FILE})
    (epath.Path(directory) / TLD_FILE).write_bytes(''.join(t + '\n' for t in self.tlds).encode())

  @classmethod
  def load(cls, directory, meta):
    path = epath.Path(directory) / meta['tld_vocab']
    try:
      text = path.read_bytes().decode('utf-8')
    except OSError as e:
      raise DataError(f'{path}: cannot read the TLD vocabulary ({e.strerror or e})') from None
    tlds = [line.rstrip('\n') for line in io.StringIO(text, newline=None) if line.strip()]
    return cls(meta['alphabet'], meta['lowercase'], tlds)


def hash_list(items) -> str:
  import hashlib
  return hashlib.blake2b('\n'.join(items).encode(), digest_size=8).hexdigest()


def build_tokenizer(config, train_split) -> DomainTokenizer:
  """The domain tokenizer of a config: its alphabet plus the TLD vocabulary counted on the
  training split (`train_split()` -> (source, record ids); a pass over the names at start-up,
  cached on disk)."""
  d = config.data
  tlds = (tld_vocabulary(*train_split(), d.tld_vocab_size)
          if 'tld' in config.model.extra_embeddings else [])
  logging.info('TLD vocabulary: %d suffixes (+ pad, other); most frequent: %s', len(tlds),
               ', '.join(tlds[:10]))
  return DomainTokenizer(d.alphabet, d.lowercase, tlds)


def open_source(config, split: str) -> DomainSource | None:
  d = config.data
  cache = textindex.cache_dir(d.cache_dir)
  files = sources.split_files(config, split)
  return None if files is None else DomainSource(
      files, cache, d.domain_part, d.domain_column, d.max_records,
      with_tld='tld' in config.model.extra_embeddings)

