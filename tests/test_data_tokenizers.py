"""Tokenizers: special ids from the vocab, no [CLS]/[SEP], vectorized char lookup, save/load."""
import numpy as np
import pytest

from mlm_jax.data import config as data_config
from mlm_jax.data import registry, tokenizers
from mlm_jax.errors import DataError

VOCAB = data_config.expand_path('{assets}/shakespeare/vocab.txt')


def test_wordpiece_specials_come_from_the_vocab():
  tok = tokenizers.WordPieceTokenizer(VOCAB)
  pieces = open(VOCAB).read().split('\n')
  assert pieces[tok.mask_id] == '[MASK]' and pieces[tok.pad_id] == '[PAD]'
  assert pieces[tok.cls_id] == '[CLS]' and pieces[tok.unk_id] == '[UNK]'
  ids = tok.encode_batch(['To be, or not to be', ''])
  assert ids[0].dtype == np.int32 and len(ids[1]) == 0
  assert not np.isin(ids[0], tok.special_ids).any()  # no [CLS]/[SEP] added
  assert tok.decode(ids[0]) == 'to be, or not to be'
  assert not np.isin(tok.normal_ids, tok.special_ids).any()
  assert len(tok.normal_ids) == tok.vocab_size - 5
  # '##' continuations do not start words.
  cont = [i for i, p in enumerate(pieces) if p.startswith('##')]
  assert cont and not tok.word_start_V[cont].any()


def test_wordpiece_vocab_without_specials_is_a_data_error(tmp_path):
  (tmp_path / 'v.txt').write_text('a\nb\n')
  with pytest.raises(DataError, match='v.txt'):
    tokenizers.WordPieceTokenizer(str(tmp_path / 'v.txt'))


def test_char_tokenizer_maps_through_a_table():
  tok = tokenizers.CharTokenizer('abc.', lowercase=True)
  assert tok.vocab_size == 9
  flat, lens = tok.encode_flat(['Ab.', 'cz', 'é a'])
  np.testing.assert_array_equal(lens, [3, 2, 3])
  a, b, c, dot = 5, 6, 7, 8
  np.testing.assert_array_equal(flat, [a, b, dot, c, tok.unk_id, tok.unk_id, tok.unk_id, a])
  # The pure-ASCII byte path agrees with the general one.
  np.testing.assert_array_equal(tok.encode_ascii(np.frombuffer(b'Ab.cz', np.uint8)), flat[:5])
  assert tok.decode([a, b, dot]) == 'ab.'
  # Word starts: after a separator (the '.'), and the separator itself.
  ids = np.array([a, b, dot, c, a])
  np.testing.assert_array_equal(tok.word_starts(ids, np.array([1, 0, 0, 0, 0], bool)),
                                [True, False, True, True, False])


def test_char_tokenizer_case_sensitive_when_asked():
  tok = tokenizers.CharTokenizer('aA', lowercase=False)
  flat, _ = tok.encode_flat(['aA'])
  np.testing.assert_array_equal(flat, [5, 6])
  np.testing.assert_array_equal(tok.encode_ascii(np.frombuffer(b'aA', np.uint8)), [5, 6])


@pytest.mark.parametrize('make', [lambda: tokenizers.CharTokenizer('xyz-', False),
                                  lambda: tokenizers.WordPieceTokenizer(VOCAB)])
def test_save_and_load(tmp_path, make):
  tok = make()
  tok.save(str(tmp_path))
  back = registry.load_tokenizer(str(tmp_path))
  assert type(back) is type(tok) and back.vocab_size == tok.vocab_size
  text = ['xy-z zz', 'hello there']
  for x, y in zip(tok.encode_batch(text), back.encode_batch(text)):
    np.testing.assert_array_equal(x, y)


def test_train_tokenizer_tool_writes_a_usable_vocab(tmp_path):
  import os
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / 'vocab.txt'
  subprocess.run([sys.executable, os.path.join(repo, 'tools', 'train_tokenizer.py'),
                  '--files={assets}/shakespeare/valid.txt', '--vocab_size=400', f'--out={out}'],
                 check=True, capture_output=True, cwd=repo)
  pieces = out.read_text().split('\n')[:-1]
  assert pieces[:5] == list(tokenizers.SPECIAL_TOKENS) and len(pieces) <= 400
  tok = tokenizers.WordPieceTokenizer(str(out))
  ids = tok.encode_batch(['Speak, speak.'])[0]
  assert len(ids) >= 3 and not np.isin(ids, tok.special_ids).any()
