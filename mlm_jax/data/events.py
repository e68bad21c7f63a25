"""Event sessions as MLM records (event-session BERT).

Input: JSON Lines, one session per line (data.text_field names the event list, default 'events'):

  {"session_id": "s42", "events": [{"type": "search", "text": "wireless headphones"},
                                   {"type": "view", "text": "Sony WH-1000 wireless headphones"},
                                   {"type": "add_to_cart", "text": "Sony WH-1000 wireless headphones"}]}

An event is an object with a string "type" (one of data.event_types) and an optional string "text".
Other keys are ignored (a split key such as "session_id" may be named in data.split_key). Events of
an unknown type (or not an object, or with a text that is not a string) are skipped and counted
(invalid_events); a line that is not a JSON object with a list of events is a bad record
(data.bad_records).

Tokens: a structural vocabulary ([PAD] [UNK] [CLS] [SEP] [MASK], then [E:type] for each event type)
followed by the WordPiece vocabulary, whose ids are shifted by the size of the structural vocabulary
(`SessionTokenizer.text_offset`, the boundary). A session reads
  [CLS] [E:search] wireless headphones [E:view] sony wh - 1000 ... [SEP]
and carries, per token, token_type_ids (0 structural, 1 text: derived from the boundary, so adding
an event type moves nothing by hand) and feature 'event_type' (1 + the event type's index for the
[E:type] token and its text, 0 on [CLS]/[SEP]/padding; model.extra_embeddings={'event_type':
len(types) + 1}).

Masking: only text tokens are masked. The [E:type] tokens are treated as special tokens (never
chosen, never drawn as random replacements): the 'event_type' feature already tells every token
its event's type, so predicting an [E:type] token would be a give-away, not a task.
"""
import hashlib
import io
import json

import numpy as np
from etils import epath

from mlm_jax.data import config as data_config
from mlm_jax.data import sources, textindex
from mlm_jax.data.tokenizers import SPECIAL_TOKENS, Tokenizer, WordPieceTokenizer, write_meta
from mlm_jax.errors import ConfigError, DataError

EVENT_FEATURE = 'event_type'


def types(spec: str) -> list[str]:
  """data.event_types ('search,view,...') as a list."""
  return [t.strip() for t in spec.split(',') if t.strip()]


class SessionTokenizer(Tokenizer):
  """Structural tokens (specials + one per event type) followed by WordPiece text pieces."""

  kind = 'session'

  def __init__(self, vocab_path: str, event_types, lowercase: bool = True):
    self.text = WordPieceTokenizer(vocab_path, lowercase)
    self.event_types = tuple(event_types)
    if not self.event_types or len(set(self.event_types)) != len(self.event_types):
      raise ConfigError('data.event_types', f'needs distinct names, got {self.event_types}')
    self.lowercase = lowercase
    self.structural = list(SPECIAL_TOKENS) + [f'[E:{t}]' for t in self.event_types]
    # The boundary: ids below it are structural, ids from it on are WordPiece pieces + text_offset.
    self.text_offset = len(self.structural)
    self.vocab_size = self.text_offset + self.text.vocab_size
    self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = range(len(SPECIAL_TOKENS))
    self.type_token = {t: len(SPECIAL_TOKENS) + i for i, t in enumerate(self.event_types)}
    self.type_feature = {t: 1 + i for i, t in enumerate(self.event_types)}  # 0 = padding
    self.word_start_V = np.concatenate([np.ones(self.text_offset, bool), self.text.word_start_V])
    self.token_type_V = (np.arange(self.vocab_size) >= self.text_offset).astype(np.uint8)
    self.pieces = self.structural + self.text.pieces

  @property
  def special_ids(self):
    # Event-type tokens and the text vocabulary's own specials (never emitted: its [UNK] maps to
    # ours) are never masked and never drawn as random replacements.
    return np.concatenate([np.arange(self.text_offset),
                           self.text.special_ids + self.text_offset]).astype(np.int32)

  def fingerprint(self):
    body = '\n'.join(self.pieces)
    return hashlib.blake2b(f'{self.kind}|{self.lowercase}|{body}'.encode(), digest_size=12).hexdigest()

  def encode_batch(self, texts):
    """Plain texts as text pieces (shifted past the structural vocabulary)."""
    out = []
    for ids in self.text.encode_batch(texts):
      ids = ids + self.text_offset
      ids[ids == self.text.unk_id + self.text_offset] = self.unk_id
      out.append(ids)
    return out

  def encode_sessions(self, sessions, counts=None):
    """Token ids and per-token event-type ids of each session (a list of event dicts)."""
    texts, where = [], []  # where[k]: (session, event type) of texts[k]
    for s, events in enumerate(sessions):
      for e in events:
        kind = e.get('type') if isinstance(e, dict) else None
        text = e.get('text', '') if isinstance(e, dict) else None
        if kind not in self.type_token or not isinstance(text, str):
          if counts is not None:
            counts['invalid_events'] += 1
          continue
        texts.append(text)
        where.append((s, kind))
    encoded = self.encode_batch(texts) if texts else []
    ids = [[] for _ in sessions]
    feats = [[] for _ in sessions]
    for (s, kind), t in zip(where, encoded):
      ids[s].append(np.concatenate([[self.type_token[kind]], t]).astype(np.int32))
      feats[s].append(np.full(len(t) + 1, self.type_feature[kind], np.int32))
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return [cat(p) for p in ids], [cat(p) for p in feats]

  def decode(self, ids):
    out, run = [], []
    for i in [int(i) for i in ids] + [-1]:
      if i >= self.text_offset:
        run.append(i - self.text_offset)
        continue
      if run:
        out.append(self.text.decode(run))
        run = []
      if i >= 0:
        out.append(self.structural[i])
    return ' '.join(out)

  def save(self, directory):
    self.text.save(directory)  # vocab.txt (and a meta file we overwrite)
    write_meta(directory, {'kind': self.kind, 'lowercase': self.lowercase, 'vocab': 'vocab.txt',
                            'event_types': list(self.event_types)})

  @classmethod
  def load(cls, directory, meta):
    return cls(str(epath.Path(directory) / meta['vocab']), meta['event_types'], meta['lowercase'])


class EventSource(sources.JsonlSource):
  """JSONL sessions, tokenized while reading (the pipeline binds the tokenizer first), so records
  reach the chunk builder as token ids plus the per-token 'event_type' feature."""

  tokenizer = None

  def with_tokenizer(self, tokenizer):
    if not isinstance(tokenizer, SessionTokenizer):
      raise ConfigError('data.tokenizer', "source='events' needs tokenizer='session'")
    self.tokenizer = tokenizer
    return self

  def read(self, ids_N, counts):
    if self.tokenizer is None:
      raise DataError('EventSource.read before with_tokenizer')
    keep, sessions, bad = [], [], []
    for k, (_, obj) in enumerate(self.objects(ids_N, counts)):
      if isinstance(obj, sources.Malformed):
        bad.append((k, obj.why))
        continue
      events = obj.get(self.text_field) if isinstance(obj, dict) else None
      if not isinstance(events, list):
        bad.append((k, f'no list of events in {self.text_field!r} (data.text_field)'))
        continue
      keep.append(k)
      sessions.append(events)
    ids, feats = self.tokenizer.encode_sessions(sessions, counts)
    features = {EVENT_FEATURE: feats} if EVENT_FEATURE in self.feature_names else {}
    return sources.Records(keep, token_ids=ids, features=features, bad=bad)


def build_tokenizer(config, train_split=None) -> SessionTokenizer:
  del train_split  # the text vocabulary comes from data.vocab_path
  d = config.data
  return SessionTokenizer(data_config.expand_path(d.vocab_path), types(d.event_types), d.lowercase)


def open_source(config, split: str) -> EventSource | None:
  d = config.data
  cache = textindex.cache_dir(d.cache_dir)
  files = sources.split_files(config, split)
  return None if files is None else EventSource(
      files, cache, d.text_field, list(config.model.extra_embeddings.keys()), d.max_records,
      d.invalid_utf8)


def read_sessions(path: str) -> list[dict]:
  """All sessions of a (small) JSONL file, local or gs://: for tools and tests."""
  text = epath.Path(path).read_bytes().decode('utf-8')
  return [json.loads(line) for line in io.StringIO(text, newline=None) if line.strip()]
