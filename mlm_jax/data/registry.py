"""Which code serves each `data.source` and `data.tokenizer`: the one module that knows them all.

Nothing below this module imports it, so the data modules form no import cycle. A new source is
one module with an opener plus one line in SOURCES (and its name in config.SOURCES, which
validation reads without importing any source):

  open(config, split) -> source | None   split 'train' or 'eval'; None = the config gives none
                                         (eval is then carved out of train by hash)

A source has `name`, `__len__`, `read(ids_N, counts) -> sources.Records`, `split_keys(key_field,
stratify_field)` and `where(i)` ('file:line' of record i); `with_tokenizer(tok)` if its records
depend on the tokenizer. sources.TextSource and sources.JsonlSource are the models to copy.
"""
from mlm_jax.data import config as data_config
from mlm_jax.data import domains, events, hf_source, sources, tfds_source, tokenizers
from mlm_jax.errors import ConfigError, DataError

# data.source -> open(config, split).
SOURCES = {
    'text': sources.open_text,
    'jsonl': sources.open_jsonl,
    'tfds': tfds_source.open_source,
    'hf': hf_source.open_source,
    'domains': domains.open_source,
    'events': events.open_source,
}
# data.tokenizer -> build(config, train_split); train_split() returns (source, record ids) of the
# training split, for a vocabulary counted on the data (called only by builders that need it).
TOKENIZERS = {
    'wordpiece': tokenizers.build_wordpiece,
    'char': tokenizers.build_char,
    'session': events.build_tokenizer,
}
# Sources whose records need a tokenizer of their own: built instead of TOKENIZERS[data.tokenizer]
# (domains: the char tokenizer plus the TLD vocabulary of the training split).
SOURCE_TOKENIZERS = {
    'domains': domains.build_tokenizer,
}
# 'kind' in a saved tokenizer.json -> load(directory, meta).
TOKENIZER_KINDS = {
    'wordpiece': tokenizers.WordPieceTokenizer.load,
    'char': tokenizers.CharTokenizer.load,
    'domain': domains.DomainTokenizer.load,
    'session': events.SessionTokenizer.load,
}


def open_source(config, split: str):
  """The source of `split` ('train' or 'eval') as config.data describes; None if it has none."""
  source = config.data.source
  if source not in SOURCES:
    raise ConfigError('data.source', f'{source!r} is not one of {tuple(SOURCES)}')
  return SOURCES[source](config, split)


def build_tokenizer(config, train_split):
  """The tokenizer config.data describes, checked against config.model.vocab_size."""
  d = config.data
  build = SOURCE_TOKENIZERS.get(d.source) or TOKENIZERS.get(d.tokenizer)
  if build is None:
    raise ConfigError('data.tokenizer', f'{d.tokenizer!r} is not one of {data_config.TOKENIZERS}')
  tok = build(config, train_split)
  tokenizers.check_vocab_size(config, tok)
  return tok


def load_tokenizer(directory: str):
  """Restores a tokenizer written by `Tokenizer.save` (e.g. from a run's workdir)."""
  meta = tokenizers.read_meta(directory)
  load = TOKENIZER_KINDS.get(meta.get('kind'))
  if load is None:
    raise DataError(f'{directory}/{tokenizers.META_FILE}: unknown tokenizer kind '
                    f'{meta.get("kind")!r}')
  return load(directory, meta)
