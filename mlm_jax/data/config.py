"""The `data` config section: fields, defaults, validation and derived values."""
import importlib.util
import math
import os

import ml_collections

from mlm_jax.errors import ConfigError

# `{assets}` in a path expands to the package's shipped assets (the quick-start corpus).
ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'assets')

SOURCES = ('text', 'jsonl', 'tfds', 'hf', 'domains', 'events')
TEXT_UNITS = ('line', 'block')
TOKENIZERS = ('wordpiece', 'char', 'session')
DOMAIN_PARTS = ('registrable', 'host')
LONG_RECORDS = ('window', 'truncate')
MASK_MODES = ('exact', 'bernoulli')
INVALID_UTF8 = ('replace', 'skip')
BAD_RECORDS = ('skip', 'error')
DEFAULT_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 .,;:!?'\"-_/()&@#"
DOMAIN_ALPHABET = 'abcdefghijklmnopqrstuvwxyz0123456789-.'  # what a host name may contain
MAX_STREAM_SHARDS = 4096  # a streamed record id packs its input shard in 12 bits (hf_source.py)


def defaults() -> ml_collections.ConfigDict:
  """The `data` section with its defaults: the shipped Shakespeare corpus, WordPiece, packing."""
  d = ml_collections.ConfigDict()
  # Where records come from: 'text' (plain text files), 'jsonl' (one JSON object per line),
  # 'tfds' (an array_record TFDS dataset, e.g. written by tools/prepare_corpus.py), 'hf' (a Hugging
  # Face `datasets` dataset; see data/hf_source.py), 'domains' (host names, one per line or a CSV
  # column; see data/domains.py) or 'events' (JSONL sessions of typed events; see data/events.py).
  d.source = 'text'
  # Training files for 'text'/'jsonl': comma-separated globs; `{assets}` = the shipped assets folder.
  d.train_files = '{assets}/shakespeare/train.txt'
  # Eval files (comma-separated globs). Empty = carve the eval split out of train_files by hash.
  d.eval_files = '{assets}/shakespeare/valid.txt'
  # License of the training data as free text (e.g. 'MPL-2.0', 'CC-BY-SA-4.0'): exported model
  # cards state it (tools/export_hf.py). '' = not stated. Never read by training.
  d.license = ''
  # What one record is in a text file: 'line' (one per line) or 'block' (blank-line separated).
  d.text_unit = 'block'
  # JSONL/TFDS/HF field holding the record's text.
  d.text_field = 'text'
  # TFDS dataset name, e.g. 'my_corpus' or 'my_corpus:1.0.0' (source='tfds').
  d.tfds_name = ''
  # TFDS data directory ('' = the TFDS default, ~/tensorflow_datasets).
  d.tfds_data_dir = ''
  # TFDS split to train on.
  d.tfds_train_split = 'train'
  # TFDS split to evaluate on. Empty = carve the eval split out of the train split by hash.
  d.tfds_eval_split = 'validation'
  # source='hf': a directory written by `save_to_disk`, or a name or path for `datasets.load_dataset`
  # (a local data directory, a builder such as 'json' with hf_data_files, a dataset in the local hub
  # cache). Set HF_DATASETS_OFFLINE=1 where nothing may be downloaded.
  d.hf_path = ''
  # source='hf': the dataset's configuration name for load_dataset ('' = its default).
  d.hf_name = ''
  # source='hf': data files for load_dataset, comma-separated globs (e.g. with hf_path='json').
  d.hf_data_files = ''
  # source='hf': the split to train on ('train[:10%]'-style slices work without streaming).
  d.hf_split = 'train'
  # source='hf': the split to evaluate on. Empty = carve the eval split out of hf_split by hash.
  d.hf_eval_split = ''
  # source='hf': stream the dataset (an IterableDataset: nothing converted up front) instead of
  # reading records by index; records come in file order, whole files shuffled per epoch.
  d.hf_streaming = False
  # Tokenizer: 'wordpiece' (BERT WordPiece from vocab_path), 'char' (one token per character) or
  # 'session' (event-type tokens, then WordPiece pieces from vocab_path; source='events').
  d.tokenizer = 'wordpiece'
  # WordPiece vocab.txt, one piece per line ([PAD] [UNK] [CLS] [SEP] [MASK] among them).
  d.vocab_path = '{assets}/shakespeare/vocab.txt'
  # Characters the 'char' tokenizer knows; any other character becomes [UNK].
  d.alphabet = DEFAULT_ALPHABET
  # Lowercase text before tokenizing (must match how the vocab was built).
  d.lowercase = True
  # Fraction of records carved out for eval when there are no eval files/split.
  d.eval_fraction = 0.05
  # Fraction of records carved out for a held-out test split (never trained or evaluated on).
  d.test_fraction = 0.0
  # JSONL/TFDS/HF field whose value decides the split (records sharing it stay together).
  # Empty = the record's text, so duplicate records never straddle train and eval.
  d.split_key = ''
  # JSONL/TFDS/HF field to stratify the carved splits by (each value gets the same fractions).
  # Empty = off.
  d.stratify_field = ''
  # Records longer than max_len - 2 tokens: 'window' (cut into windows at a random offset that
  # changes every epoch) or 'truncate' (keep the first max_len - 2 tokens).
  d.long_records = 'window'
  # Pack several records into one row (segment_ids tell them apart); False pads each record to max_len.
  d.packing = True
  # Prediction slots per row (P): the MLM head runs on these only. 0 = auto: ceil(mask_rate * max_len)
  # + 1 + max_len // 64, rounded up to 4 (24 at L=128, where text rows had at most 20). Rows with more
  # chosen tokens keep the extra ones unmasked and count them in data stats 'masked_over_cap'.
  d.max_predictions = 0
  # Fraction of maskable tokens chosen for prediction.
  d.mask_rate = 0.15
  # 'exact' (round(mask_rate * n) tokens per record, at least 1, exact 80/10/10 counts)
  # or 'bernoulli' (each token chosen independently).
  d.mask_mode = 'exact'
  # Of the chosen tokens, this fraction becomes [MASK] ...
  d.mask_token_frac = 0.8
  # ... this fraction a random non-special token, and the rest stay unchanged.
  d.random_token_frac = 0.1
  # Choose whole words (a word-start token and its continuation pieces) instead of single tokens.
  d.whole_word_mask = False
  # Records per unit of work (a worker reads, tokenizes, packs and masks this many at once);
  # packing happens within a chunk. Raise it for short records (e.g. 16384 for domain names).
  d.chunk_records = 512
  # Logical input shards (0 = one per process). The global batch is the same for every process
  # count that divides it, so a run can move between host layouts and resume exactly.
  d.num_shards = 0
  # Worker processes for the input pipeline (0 = in the training process, in a background thread).
  d.num_workers = 0
  # Chunks each worker may prepare ahead of time.
  d.worker_buffer_size = 2
  # Chunks prepared ahead of time in the training process (background thread; 0 = none).
  d.prefetch_chunks = 2
  # Invalid UTF-8 in a record: 'replace' (with U+FFFD) or 'skip' (drop the record). Counted either way.
  d.invalid_utf8 = 'replace'
  # A malformed record (bad JSON, a missing or mistyped field, a line that is no domain name, a
  # feature that does not fit its tokens, invalid UTF-8 under invalid_utf8='skip'): 'skip' (drop
  # it, count it as bad_records, log file:line of the first 5) or 'error' (stop at the first one
  # with an error naming its file:line and what is wrong).
  d.bad_records = 'skip'
  # Stop with an error naming the file when more than this fraction of the records read (since the
  # run started or resumed; checked once 1,000 were read) are bad: a mostly-garbage corpus must not
  # train on the little that is left. 1 = never stop.
  d.max_bad_fraction = 0.01
  # source='domains': the record text, 'registrable' (the label left of the public suffix:
  # 'example' from 'www.example.co.uk') or 'host' (everything left of the suffix: 'www.example').
  d.domain_part = 'registrable'
  # source='domains': '' = one name per line; else the CSV column holding it (header name, or a
  # 0-based number for CSV files without a header).
  d.domain_column = ''
  # source='domains': TLD ids incl. 0 = padding and 1 = other; the tld_vocab_size - 2 most frequent
  # public suffixes of the training split get their own id. Equals model.extra_embeddings.tld.
  d.tld_vocab_size = 512
  # source='events': the event types, comma-separated; each gets a token [E:type] and an id
  # (1, 2, ... in this order; 0 = padding) in feature 'event_type'. Other types are skipped, counted.
  d.event_types = 'search,view,add_to_cart,purchase'
  # Use only the first N records of each split's source (0 = all); handy for quick runs.
  d.max_records = 0
  # Where record-offset indexes of text/JSONL files are cached: '' = ~/.cache/mlm_jax (or the temp
  # dir if that is not writable); a directory, local or gs://, e.g. beside the run
  # (gs://BUCKET/run/index_cache); '{data}' stands for each data file's own directory, so
  # '{data}/.mlm_jax_index' keeps the indexes beside the data. Keyed by path, size and mtime.
  d.cache_dir = ''
  return d


def expand_path(path: str) -> str:
  return os.path.expanduser(path.strip().replace('{assets}', ASSETS_DIR))


def max_predictions(config) -> int:
  """P: the configured number of prediction slots, or the auto value."""
  d, max_len = config.data, config.model.max_len
  if d.max_predictions:
    return int(d.max_predictions)
  p = math.ceil(d.mask_rate * max_len) + 1 + max_len // 64
  return min(max_len, -(-p // 4) * 4)


def _check(ok, field, message):
  if not ok:
    raise ConfigError(field, message)


def _choice(d, name, choices):
  _check(d[name] in choices, f'data.{name}', f'{d[name]!r} is not one of {choices}')


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad data-related field. Takes the whole config."""
  d, m = config.data, config.model
  for name, choices in (('source', SOURCES), ('text_unit', TEXT_UNITS), ('tokenizer', TOKENIZERS),
                        ('long_records', LONG_RECORDS), ('mask_mode', MASK_MODES),
                        ('invalid_utf8', INVALID_UTF8), ('domain_part', DOMAIN_PARTS),
                        ('bad_records', BAD_RECORDS)):
    _choice(d, name, choices)
  _check(isinstance(config.seed, int) and 0 <= config.seed < 2**32, 'seed',
         f'must be an int in [0, 2**32), got {config.seed!r}')
  _check(m.max_len >= 4, 'model.max_len', f'must be >= 4 ([CLS] x [SEP] plus room), got {m.max_len}')
  _check(0 < d.mask_rate < 1, 'data.mask_rate', f'must be in (0, 1), got {d.mask_rate}')
  for name in ('mask_token_frac', 'random_token_frac'):
    _check(0 <= d[name] <= 1, f'data.{name}', f'must be in [0, 1], got {d[name]}')
  _check(d.mask_token_frac + d.random_token_frac <= 1, 'data.random_token_frac',
         'mask_token_frac + random_token_frac must be <= 1')
  for name in ('eval_fraction', 'test_fraction'):
    _check(0 <= d[name] < 1, f'data.{name}', f'must be in [0, 1), got {d[name]}')
  _check(0 <= d.max_bad_fraction <= 1, 'data.max_bad_fraction',
         f'must be in [0, 1], got {d.max_bad_fraction}')
  _check(d.eval_fraction + d.test_fraction < 1, 'data.test_fraction',
         'eval_fraction + test_fraction must be < 1 (nothing left to train on)')
  for name in ('max_predictions', 'num_workers', 'prefetch_chunks', 'max_records', 'num_shards'):
    _check(d[name] >= 0, f'data.{name}', f'must be >= 0, got {d[name]}')
  for name in ('chunk_records', 'worker_buffer_size'):
    _check(d[name] >= 1, f'data.{name}', f'must be >= 1, got {d[name]}')
  _check(d.max_predictions <= m.max_len, 'data.max_predictions',
         f'{d.max_predictions} is more than model.max_len {m.max_len}')
  if d.source in ('text', 'jsonl', 'domains', 'events'):
    _check(d.train_files.strip(), 'data.train_files', f'required for source={d.source!r}')
  if d.source == 'tfds':
    _check(d.tfds_name, 'data.tfds_name', "required for source='tfds'")
  if d.source == 'hf':
    _check(importlib.util.find_spec('datasets') is not None, 'data.source',
           "source='hf' needs the datasets package: pip install 'mlm_jax[hf_data]' (or datasets)")
    _check(d.hf_path.strip(), 'data.hf_path', "required for source='hf'")
    _check(d.hf_split.strip(), 'data.hf_split', "required for source='hf'")
    if d.hf_streaming:
      _check(not d.stratify_field, 'data.stratify_field', 'a streamed dataset is split record by '
             'record; stratifying needs every record up front (data.hf_streaming=False)')
      _check(d.num_shards <= MAX_STREAM_SHARDS, 'data.num_shards',
             f'at most {MAX_STREAM_SHARDS} with data.hf_streaming, got {d.num_shards}')
  if d.source == 'text':
    if len(m.extra_embeddings):
      raise ConfigError('model.extra_embeddings', "plain text has no feature fields; use "
                        "data.source='jsonl' or 'tfds' for extra embeddings")
    for name in ('split_key', 'stratify_field'):
      _check(not d[name], f'data.{name}', "needs records with fields (source='jsonl' or 'tfds')")
  extra = dict(m.extra_embeddings)
  if d.source == 'domains':
    _check(d.tokenizer == 'char', 'data.tokenizer', "source='domains' reads names character by "
           "character: set data.tokenizer='char'")
    _check(set(extra) <= {'tld'}, 'model.extra_embeddings',
           f"source='domains' provides only 'tld', not {sorted(set(extra) - {'tld'})}")
    _check(d.tld_vocab_size >= 2, 'data.tld_vocab_size', f'must be >= 2, got {d.tld_vocab_size}')
    _check(extra.get('tld', d.tld_vocab_size) == d.tld_vocab_size, 'model.extra_embeddings',
           f"tld is {extra.get('tld')} but data.tld_vocab_size is {d.tld_vocab_size}")
    _check(d.split_key == '', 'data.split_key', "source='domains' splits by the name itself")
    _check(d.stratify_field in ('', 'tld'), 'data.stratify_field',
           f"source='domains' can stratify only by 'tld', not {d.stratify_field!r}")
  _check((d.source == 'events') == (d.tokenizer == 'session'), 'data.tokenizer',
         "source='events' and tokenizer='session' go together")
  if d.source == 'events':
    types = [t.strip() for t in d.event_types.split(',')]
    _check(all(types) and len(set(types)) == len(types), 'data.event_types',
           f'needs distinct, non-empty comma-separated names, got {d.event_types!r}')
    _check(set(extra) <= {'event_type'}, 'model.extra_embeddings',
           f"source='events' provides only 'event_type', not {sorted(set(extra) - {'event_type'})}")
    _check(extra.get('event_type', len(types) + 1) == len(types) + 1, 'model.extra_embeddings',
           f"event_type must be len(data.event_types) + 1 = {len(types) + 1}, got "
           f"{extra.get('event_type')}")
  if d.tokenizer in ('wordpiece', 'session'):
    _check(d.vocab_path, 'data.vocab_path', f"required for tokenizer={d.tokenizer!r}")
  else:
    _check(d.alphabet, 'data.alphabet', "required for tokenizer='char'")
    _check(len(set(d.alphabet)) == len(d.alphabet), 'data.alphabet', 'has repeated characters')
  t = config.train
  _check(t.batch_size >= 1, 'train.batch_size', f'must be >= 1, got {t.batch_size}')
