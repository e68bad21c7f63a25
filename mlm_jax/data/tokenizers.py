"""Tokenizers: BERT WordPiece (HF `tokenizers`) and a vectorized character tokenizer.

Both return ids without [CLS]/[SEP] (the sequence builder adds them) and expose the special ids,
so no code hard-codes an id. Which class serves which data.tokenizer (and tokenizer.json kind) is
registry.py's business.
"""
import functools
import hashlib
import io
import json

import numpy as np
from etils import epath

from mlm_jax.data import config as data_config
from mlm_jax.errors import ConfigError, DataError

SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')
META_FILE = 'tokenizer.json'


class Tokenizer:
  """Common interface. Subclasses set `vocab_size`, the special ids and `word_start_V`."""

  kind = ''
  vocab_size: int
  pad_id: int
  unk_id: int
  cls_id: int
  sep_id: int
  mask_id: int
  # word_start_V[id]: the token may begin a word (False for WordPiece '##' continuations).
  word_start_V: np.ndarray
  # token_type_V[id]: the token's token_type_ids value; None = all 0 (plain text).
  token_type_V: np.ndarray | None = None

  @property
  def special_ids(self) -> np.ndarray:
    return np.array([self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id], np.int32)

  @functools.cached_property
  def normal_ids(self) -> np.ndarray:
    """Ids a random replacement may draw from: everything but the special tokens."""
    keep = np.ones(self.vocab_size, bool)
    keep[self.special_ids] = False
    return np.flatnonzero(keep).astype(np.int32)

  def fingerprint(self) -> str:
    """Identifies the exact mapping text -> ids (kind, casing and vocabulary)."""
    body = '\n'.join(self.pieces) if self.kind == 'wordpiece' else self.alphabet
    return hashlib.blake2b(f'{self.kind}|{self.lowercase}|{body}'.encode(), digest_size=12).hexdigest()

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    raise NotImplementedError

  def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All texts' ids concatenated, plus the per-text lengths (what the pipeline consumes)."""
    ids = self.encode_batch(texts)
    lens = np.fromiter(map(len, ids), np.int64, len(ids))
    flat = np.concatenate(ids) if ids else np.zeros(0, np.int32)
    return flat.astype(np.int32, copy=False), lens

  def word_starts(self, ids_N: np.ndarray, first_N: np.ndarray) -> np.ndarray:
    """Which tokens begin a word, given flat ids and a mask of each record's first token."""
    return self.word_start_V[ids_N] | first_N

  def decode(self, ids) -> str:
    raise NotImplementedError

  def save(self, directory) -> None:
    """Writes the tokenizer into `directory` (a str or epath.Path, local or gs://)."""
    raise NotImplementedError


class WordPieceTokenizer(Tokenizer):
  """BERT WordPiece over a vocab.txt, through HF `tokenizers` (Rust, batched)."""

  kind = 'wordpiece'

  def __init__(self, vocab_path: str, lowercase: bool = True):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers
    try:
      text = epath.Path(vocab_path).read_bytes().decode('utf-8')  # local or gs://
      # Lines as a text-mode open() splits them (universal newlines).
      self.pieces = [line.rstrip('\r\n') for line in io.StringIO(text, newline=None)]
    except OSError as e:
      raise DataError(f'{vocab_path}: cannot read vocab ({e.strerror or e})') from None
    vocab = {}
    for i, piece in enumerate(self.pieces):
      if not piece:
        raise DataError(f'{vocab_path}:{i + 1}: empty vocab entry')
      vocab.setdefault(piece, i)
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
      raise DataError(f'{vocab_path}: vocab lacks special tokens {missing}')
    self.vocab_path, self.lowercase = vocab_path, lowercase
    self.vocab_size = len(self.pieces)
    self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
        vocab[t] for t in SPECIAL_TOKENS)
    self.word_start_V = np.array([not p.startswith('##') for p in self.pieces], bool)
    tok = HFTokenizer(models.WordPiece(vocab, unk_token='[UNK]', max_input_chars_per_word=100))
    # clean_text drops control characters (NUL included) and normalizes whitespace.
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    self._hf = tok

  def encode_batch(self, texts):
    encodings = self._hf.encode_batch_fast(texts, add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in encodings]

  def decode(self, ids):
    return self._hf.decode([int(i) for i in ids], skip_special_tokens=False)

  def save(self, directory):
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / 'vocab.txt').write_bytes(('\n'.join(self.pieces) + '\n').encode('utf-8'))
    write_meta(directory, {'kind': self.kind, 'lowercase': self.lowercase, 'vocab': 'vocab.txt'})

  @classmethod
  def load(cls, directory, meta):
    return cls(str(epath.Path(directory) / meta['vocab']), meta['lowercase'])


class CharTokenizer(Tokenizer):
  """One token per character of a declared alphabet; a numpy lookup table maps code points to ids.

  Special tokens take ids 0..4, the alphabet follows in order. Characters outside the alphabet
  map to [UNK]. Word boundaries (for whole-word masking) are the non-alphanumeric characters.
  """

  kind = 'char'

  def __init__(self, alphabet: str, lowercase: bool = True):
    if not alphabet or len(set(alphabet)) != len(alphabet):
      raise ConfigError('data.alphabet', 'must be non-empty without repeated characters')
    self.alphabet, self.lowercase = alphabet, lowercase
    self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = range(len(SPECIAL_TOKENS))
    self.vocab_size = len(SPECIAL_TOKENS) + len(alphabet)
    codes = np.array([ord(c) for c in alphabet], np.int64)
    # Last slot catches every code point above the alphabet's largest one.
    self._lut = np.full(codes.max() + 2, self.unk_id, np.int32)
    self._lut[codes] = np.arange(len(alphabet), dtype=np.int32) + len(SPECIAL_TOKENS)
    # Pure-ASCII input skips decoding: bytes index this 128-entry table directly.
    self._byte_lut = np.full(128, self.unk_id, np.int32)
    ascii_ = codes < 128
    self._byte_lut[codes[ascii_]] = self._lut[codes[ascii_]]
    if lowercase:  # fold ASCII upper case in the byte table too
      upper = np.arange(ord('A'), ord('Z') + 1)
      self._byte_lut[upper] = self._byte_lut[upper + 32]
    self.word_start_V = np.ones(self.vocab_size, bool)
    sep = np.zeros(self.vocab_size, bool)
    sep[:len(SPECIAL_TOKENS)] = True
    sep[len(SPECIAL_TOKENS):] = [not c.isalnum() for c in alphabet]
    self._separator_V = sep

  def encode_flat(self, texts):
    if self.lowercase:
      texts = [t.lower() for t in texts]
    lens = np.fromiter(map(len, texts), np.int64, len(texts))
    joined = ''.join(texts)
    if joined.isascii():
      return self._byte_lut[np.frombuffer(joined.encode('ascii'), np.uint8)], lens
    codes = np.frombuffer(joined.encode('utf-32-le'), np.uint32)
    return self._lut[np.minimum(codes, len(self._lut) - 1)], lens

  def encode_ascii(self, bytes_N: np.ndarray) -> np.ndarray:
    """Fast path for pure-ASCII input already in a uint8 array (lowercasing folded in)."""
    return self._byte_lut[bytes_N]

  def encode_batch(self, texts):
    flat, lens = self.encode_flat(texts)
    return np.split(flat, np.cumsum(lens)[:-1]) if len(texts) else []

  def word_starts(self, ids_N, first_N):
    sep_N = self._separator_V[ids_N]
    prev_sep_N = np.concatenate([[True], sep_N[:-1]])
    return first_N | sep_N | prev_sep_N

  def decode(self, ids):
    names = list(SPECIAL_TOKENS) + list(self.alphabet)
    return ''.join(names[int(i)] for i in ids)

  def save(self, directory):
    write_meta(directory, {'kind': self.kind, 'lowercase': self.lowercase, 'alphabet': self.alphabet})

  @classmethod
  def load(cls, directory, meta):
    return cls(meta['alphabet'], meta['lowercase'])


def write_meta(directory, meta):
  """tokenizer.json: the tokenizer's kind (the registry's loader key) and its settings."""
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / META_FILE).write_bytes(json.dumps(meta, ensure_ascii=False, indent=1).encode())


def read_meta(directory) -> dict:
  """The tokenizer.json `write_meta` wrote."""
  path = epath.Path(directory) / META_FILE
  try:
    return json.loads(path.read_bytes().decode('utf-8'))
  except (OSError, ValueError) as e:
    raise DataError(f'{path}: cannot load tokenizer ({e})') from None


def build_wordpiece(config, train_split=None) -> WordPieceTokenizer:
  del train_split  # the vocabulary comes from data.vocab_path
  return WordPieceTokenizer(data_config.expand_path(config.data.vocab_path), config.data.lowercase)


def build_char(config, train_split=None) -> CharTokenizer:
  del train_split
  return CharTokenizer(config.data.alphabet, config.data.lowercase)


def check_vocab_size(config, tok: Tokenizer) -> None:
  if config.model.vocab_size != tok.vocab_size:
    raise ConfigError('model.vocab_size', f'{config.model.vocab_size} does not match the '
                      f'{tok.kind} tokenizer\'s vocabulary size {tok.vocab_size}')
