r"""Trains a BERT WordPiece vocab.txt on text files (HF `tokenizers`, BertWordPieceTokenizer-style).

  python tools/train_tokenizer.py --files='corpus/*.txt' --vocab_size=8192 --out=vocab.txt

The special tokens come first: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4. Normalization matches
`WordPieceTokenizer` (BERT normalizer, optional lowercasing), so the vocab fits the pipeline.
"""
import os

from absl import app, flags

from mlm_jax.data import sources
from mlm_jax.data.tokenizers import SPECIAL_TOKENS

flags.DEFINE_string('files', None, 'Comma-separated globs of text files.', required=True)
flags.DEFINE_integer('vocab_size', 8192, 'Vocabulary size, special tokens included.')
flags.DEFINE_string('out', 'vocab.txt', 'Where to write vocab.txt.')
flags.DEFINE_bool('lowercase', True, 'Lowercase text (set data.lowercase the same way).')
flags.DEFINE_integer('min_frequency', 2, 'Ignore pairs rarer than this.')
flags.DEFINE_integer('limit_alphabet', 1000, 'At most this many initial characters.')
FLAGS = flags.FLAGS


def train(files, vocab_size, out, lowercase=True, min_frequency=2, limit_alphabet=1000):
  """Trains on `files` and writes `out`; returns the number of pieces written."""
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
  tok = Tokenizer(models.WordPiece(unk_token='[UNK]'))
  tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                              strip_accents=None, lowercase=lowercase)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  trainer = trainers.WordPieceTrainer(
      vocab_size=vocab_size, min_frequency=min_frequency, limit_alphabet=limit_alphabet,
      special_tokens=list(SPECIAL_TOKENS), continuing_subword_prefix='##', show_progress=False)
  tok.train(files, trainer)
  vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
  assert [p for p, _ in vocab[:len(SPECIAL_TOKENS)]] == list(SPECIAL_TOKENS), vocab[:5]
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, 'w', encoding='utf-8') as f:
    f.write(''.join(p + '\n' for p, _ in vocab))
  return len(vocab)


def main(argv):
  del argv
  files = sources.expand_globs(FLAGS.files, 'files')
  n = train(files, FLAGS.vocab_size, FLAGS.out, FLAGS.lowercase, FLAGS.min_frequency,
            FLAGS.limit_alphabet)
  print(f'wrote {FLAGS.out}: {n} pieces from {len(files)} file(s)')


if __name__ == '__main__':
  app.run(main)
