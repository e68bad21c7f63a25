r"""Turns local text or JSONL files into a TFDS dataset (array_record) for `data.source='tfds'`.

It writes a real TFDS dataset (a GeneratorBasedBuilder, no TensorFlow needed): splits 'train' and
'validation' (from --eval_files, or carved out of --files by a hash of the split key), readable with
`tfds.data_source(name, split=..., data_dir=...)`. With --tokenizer the text is stored as token ids
(pre-tokenized, so training workers skip tokenizing); the tokenizer's fingerprint goes into the
dataset's metadata.json and the pipeline refuses a different tokenizer.

  python tools/prepare_corpus.py --files='corpus/*.txt' --text_unit=block --name=my_corpus \
      --data_dir=/data/tfds --tokenizer=wordpiece --vocab_path=vocab.txt
"""
import json

import numpy as np
from absl import app, flags, logging

from mlm_jax.data import config as data_config
from mlm_jax.data import sources, split, textindex
from mlm_jax.data.tokenizers import CharTokenizer, WordPieceTokenizer

flags.DEFINE_string('files', None, 'Comma-separated globs of input files.', required=True)
flags.DEFINE_string('eval_files', '', 'Globs for the validation split ("" = carve from --files).')
flags.DEFINE_enum('format', 'text', ['text', 'jsonl'], 'Input format.')
flags.DEFINE_enum('text_unit', 'line', ['line', 'block'], 'Text record: a line or a blank-line block.')
flags.DEFINE_string('text_field', 'text', 'JSONL field holding the text.')
flags.DEFINE_list('features', [], 'JSONL integer feature fields to keep (ints or int lists).')
flags.DEFINE_string('name', None, 'TFDS dataset name (snake_case).', required=True)
flags.DEFINE_string('version', '1.0.0', 'Dataset version.')
flags.DEFINE_string('data_dir', None, 'TFDS data directory to write into.', required=True)
flags.DEFINE_float('eval_fraction', 0.05, 'Fraction carved out for validation without --eval_files.')
flags.DEFINE_string('split_key', '', 'JSONL field deciding the split ("" = the record text).')
flags.DEFINE_enum('tokenizer', 'none', ['none', 'wordpiece', 'char'], 'Store token ids, not text.')
flags.DEFINE_string('vocab_path', '', 'vocab.txt for --tokenizer=wordpiece.')
flags.DEFINE_string('alphabet', data_config.DEFAULT_ALPHABET, 'Alphabet for --tokenizer=char.')
flags.DEFINE_bool('lowercase', True, 'Lowercase before tokenizing.')
flags.DEFINE_string('cache_dir', '', 'Where to cache the input files\' offset indexes.')
flags.DEFINE_integer('chunk', 4096, 'Records tokenized at once.')


def _open(files_spec, fmt, unit, text_field, features, cache):
  files = sources.expand_globs(files_spec, 'files')
  if fmt == 'text':
    return sources.TextSource(files, unit, cache)
  return sources.JsonlSource(files, cache, text_field, features)


def _examples(source, ids, text_field, features, tokenizer, chunk):
  """Yields (key, example) for the records `ids` of `source`."""
  counts = sources.new_counts()
  for lo in range(0, len(ids), chunk):
    part = ids[lo:lo + chunk]
    recs = source.read(part, counts)
    counts['bad_records'] += len(recs.bad)  # malformed records are dropped, and counted
    if recs.texts is not None and tokenizer is not None:
      values = tokenizer.encode_batch(recs.texts)
    else:
      values = recs.texts if recs.texts is not None else recs.token_ids
    for j, k in enumerate(recs.keep_N.tolist()):
      ex = {text_field: values[j]}
      for name in features:
        v = recs.features[name][j]
        ex[name] = v if isinstance(v, int) else np.asarray(v, np.int32)
      yield int(part[k]), ex
  if any(counts.values()):
    logging.warning('input counters: %s', dict(counts))


def _feature_spec(source, text_field, features, tokenizer):
  import tensorflow_datasets as tfds
  first = source.read(np.arange(1), sources.new_counts())
  pre = tokenizer is not None or first.token_ids is not None
  spec = {text_field: tfds.features.Tensor(shape=(None,), dtype=np.int32) if pre
          else tfds.features.Text()}
  for name in features:
    v = first.features[name][0]
    spec[name] = (np.int64 if isinstance(v, int)
                  else tfds.features.Tensor(shape=(None,), dtype=np.int32))
  return tfds.features.FeaturesDict(spec)


def build(argv_flags) -> str:
  """Writes the dataset; returns its directory."""
  import tensorflow_datasets as tfds
  f = argv_flags
  cache = textindex.cache_dir(f.cache_dir)
  tokenizer = None
  if f.tokenizer == 'wordpiece':
    tokenizer = WordPieceTokenizer(data_config.expand_path(f.vocab_path), f.lowercase)
  elif f.tokenizer == 'char':
    tokenizer = CharTokenizer(f.alphabet, f.lowercase)
  train = _open(f.files, f.format, f.text_unit, f.text_field, f.features, cache)
  splits = {}
  if f.eval_files:
    ev = _open(f.eval_files, f.format, f.text_unit, f.text_field, f.features, cache)
    splits = {'train': (train, np.arange(len(train))), 'validation': (ev, np.arange(len(ev)))}
  else:
    hashes, _ = train.split_keys(f.split_key, '')
    assignment = split.assign(hashes, f.eval_fraction, 0.0)
    splits = {'train': (train, split.select(assignment, 'train')),
              'validation': (train, split.select(assignment, 'eval'))}
  splits = {k: v for k, v in splits.items() if len(v[1])}  # TFDS refuses empty splits
  metadata = {'text_field': f.text_field, 'features': list(f.features),
              'tokenizer': None if tokenizer is None else {
                  'kind': tokenizer.kind, 'vocab_size': tokenizer.vocab_size,
                  'fingerprint': tokenizer.fingerprint()}}
  spec = _feature_spec(train, f.text_field, f.features, tokenizer)

  class Corpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = f.name
    VERSION = tfds.core.Version(f.version)

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=spec, description=json.dumps(metadata),
                                   metadata=tfds.core.MetadataDict(metadata))

    def _split_generators(self, dl_manager):
      return {name: self._generate_examples(name) for name in splits}

    def _generate_examples(self, name):
      source, ids = splits[name]
      yield from _examples(source, ids, f.text_field, f.features, tokenizer, f.chunk)

  builder = Corpus(data_dir=f.data_dir, file_format='array_record')
  builder.download_and_prepare()
  logging.info('Wrote %s (%s)', builder.data_dir,
               {k: v.num_examples for k, v in builder.info.splits.items()})
  return str(builder.data_dir)


def main(argv):
  del argv
  print(build(flags.FLAGS))


if __name__ == '__main__':
  app.run(main)
