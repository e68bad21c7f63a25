"""Text/JSONL sources and bad input: each case gives the right error or counter."""
import json
import os

import ml_collections
import numpy as np
import pytest

from mlm_jax import data
from mlm_jax.data import pipeline, sources, textindex
from mlm_jax.errors import ConfigError, DataError


def make_config(tmp_path, train_files, **overrides):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict(
      {'max_len': 32, 'vocab_size': 0, 'extra_embeddings': ml_collections.ConfigDict()})
  c.train = ml_collections.ConfigDict({'batch_size': 4, 'grad_accum_steps': 1})
  c.data = data.defaults()
  c.data.update(train_files=str(train_files), eval_files='', eval_fraction=0.0, text_unit='line',
                tokenizer='char', cache_dir=str(tmp_path / 'cache'), chunk_records=8)
  c.data.update(overrides)
  c.model.vocab_size = data.CharTokenizer(c.data.alphabet).vocab_size
  return c


def counts_after(c, n=3):
  it = data.train_iterator(c, data.build_tokenizer(c))
  for _ in range(n):
    next(it)
  return it.stats.as_dict()


def write(path, content: bytes):
  path.write_bytes(content)
  return path


def read_all(source):
  return [source.read_raw([i])[0] for i in range(len(source))]


def test_line_index_skips_empty_and_blank_lines_and_trims(tmp_path):
  p = write(tmp_path / 'a.txt', b'  one \r\n\n   \ntwo\t\nthree')  # no final newline
  s = sources.TextSource([str(p)], 'line', str(tmp_path))
  assert read_all(s) == [b'one', b'two', b'three']
  assert s.fileset.empty_lines == 2


def test_block_index_joins_lines_between_blank_lines(tmp_path, monkeypatch):
  text = b'a b\nc\n\n \n\nd\n\ne\nf\ng\n\n'
  p = write(tmp_path / 'b.txt', text)
  monkeypatch.setattr(textindex, '_BLOCK', 3)  # blocks must also join across read buffers
  s = sources.TextSource([str(p)], 'block', str(tmp_path / 'c1'))
  assert read_all(s) == [b'a b\nc', b'd', b'e\nf\ng']
  monkeypatch.setattr(textindex, '_BLOCK', 1 << 20)
  assert read_all(sources.TextSource([str(p)], 'block', str(tmp_path / 'c2'))) == read_all(s)


def test_index_cache_is_reused_and_invalidated_by_changes(tmp_path):
  p = write(tmp_path / 'a.txt', b'x\ny\n')
  cache = tmp_path / 'cache'
  assert len(sources.TextSource([str(p)], 'line', str(cache))) == 2
  assert len(os.listdir(cache)) == 1
  write(p, b'x\ny\nz\n')
  os.utime(p, ns=(1, 10**18))
  assert len(sources.TextSource([str(p)], 'line', str(cache))) == 3


def test_glob_matching_nothing_is_a_data_error(tmp_path):
  c = make_config(tmp_path, tmp_path / 'missing*.txt')
  with pytest.raises(DataError, match='missing'):
    data.train_iterator(c, data.build_tokenizer(c))


def test_unreadable_file_is_a_data_error_naming_it(tmp_path):
  (tmp_path / 'dir.txt').mkdir()  # matched by the glob, cannot be read as a file
  c = make_config(tmp_path, tmp_path / 'dir.txt')
  with pytest.raises(DataError, match='dir.txt'):
    data.train_iterator(c, data.build_tokenizer(c))


def test_empty_corpus_is_a_data_error(tmp_path):
  c = make_config(tmp_path, write(tmp_path / 'e.txt', b'\n  \n\n'))
  with pytest.raises(DataError, match='e.txt'):
    data.train_iterator(c, data.build_tokenizer(c))


def test_vocab_size_mismatch_is_a_config_error(tmp_path):
  c = make_config(tmp_path, write(tmp_path / 'a.txt', b'abc\n'))
  c.model.vocab_size += 1
  with pytest.raises(ConfigError, match='model.vocab_size'):
    data.build_tokenizer(c)


@pytest.mark.parametrize('field,value', [('mask_rate', 1.5), ('source', 'csv'),
                                         ('long_records', 'drop'), ('eval_fraction', -0.1)])
def test_bad_config_values_name_the_field(tmp_path, field, value):
  c = make_config(tmp_path, tmp_path / 'a.txt')
  c.data[field] = value
  with pytest.raises(ConfigError, match=f'data.{field}'):
    data.validate(c)


def test_empty_lines_invalid_utf8_nul_and_unknown_chars_are_counted(tmp_path):
  good = b''.join(b'line %d\n' % i for i in range(30))
  p = write(tmp_path / 'bad.txt', b'\n\n' + b'caf\xc3\xa9 \xff\xfe bad\n' + b'nul\x00here\n' + good)
  st = counts_after(make_config(tmp_path, p), n=10)
  assert st['empty_lines'] == 2
  assert st['invalid_utf8_records'] >= 1
  assert st['nul_bytes'] >= 1
  assert st['unk_tokens'] >= 3  # e-acute and two replacement characters are not in the alphabet


def test_invalid_utf8_skip_drops_the_record(tmp_path):
  p = write(tmp_path / 'bad.txt', b'\xff\xfe\n' * 5 + b'ok\n' * 5)
  c = make_config(tmp_path, p, invalid_utf8='skip', packing=False, chunk_records=10)
  c.train.batch_size = 5
  it = data.train_iterator(c, data.build_tokenizer(c))
  batch = next(it)
  assert it.stats.counts['invalid_utf8_records'] == 5
  assert (batch['segment_ids'].sum(axis=1) == 4).all()  # only the 'ok' records: [CLS] o k [SEP]


def test_long_records_are_windowed_or_truncated_and_counted(tmp_path):
  p = write(tmp_path / 'long.txt', b'a' * 100 + b'\n' + b'short\n')
  # 100 tokens, 30 per piece: 4 windows, or 5 when the random offset leaves a head piece.
  for mode, pieces in (('window', (5, 6)), ('truncate', (2,))):
    c = make_config(tmp_path, p, long_records=mode, chunk_records=2)
    c.train.batch_size = 1
    it = data.train_iterator(c, data.build_tokenizer(c))
    next(it)
    assert it.stats.counts['long_records'] == 1
    assert it.stats.counts['pieces'] in pieces


def test_masked_over_cap_is_counted(tmp_path):
  p = write(tmp_path / 'a.txt', b''.join(b'ab\n' for _ in range(64)))
  c = make_config(tmp_path, p, max_predictions=2, chunk_records=64)
  st = counts_after(c, n=1)
  assert st['masked_over_cap'] > 0  # 8 two-char records per row, one chosen token each


def write_jsonl(path, rows):
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return path


def jsonl_config(tmp_path, rows, **kw):
  c = make_config(tmp_path, write_jsonl(tmp_path / 'r.jsonl', rows), source='jsonl', **kw)
  c.model.extra_embeddings = ml_collections.ConfigDict({'tld': 8, 'kind': 4})
  return c


def test_jsonl_features_per_record_and_per_token(tmp_path):
  rows = [{'text': 'abc', 'tld': 3, 'kind': [1, 2, 3]}, {'text': 'de', 'tld': 5, 'kind': [3, 3]}]
  c = jsonl_config(tmp_path, rows, packing=True, chunk_records=2)
  c.train.batch_size = 1
  it = data.train_iterator(c, data.build_tokenizer(c))
  b = next(it)
  seg, tld, kind = b['segment_ids'][0], b['tld'][0], b['kind'][0]
  assert b['tld'].shape == b['kind'].shape == (1, 32) and b['tld'].dtype == np.int32
  assert sorted(set(tld[seg == 1]) | set(tld[seg == 2])) == [3, 5]
  for s in (1, 2):
    assert len(set(tld[seg == s])) == 1  # broadcast over the record, [CLS]/[SEP] included
    k = kind[seg == s]
    assert k[0] == 0 and k[-1] == 0  # specials carry no per-token feature
    assert list(k[1:-1]) in ([1, 2, 3], [3, 3])
  assert (tld[seg == 0] == 0).all() and (kind[seg == 0] == 0).all()


def test_jsonl_bad_feature_records_are_skipped_and_counted(tmp_path):
  rows = [{'text': 'abc', 'tld': 9, 'kind': [1, 2, 3]},   # tld outside its vocabulary of 8
          {'text': 'ab', 'tld': 1, 'kind': [1]}] + [      # wrong per-token length
              {'text': 'ok', 'tld': 1, 'kind': [0, 1]}] * 6
  c = jsonl_config(tmp_path, rows, chunk_records=8, packing=False)
  c.train.batch_size = 6
  st = counts_after(c, n=1)  # one chunk: the whole file once
  assert st['records'] == 8 and st['bad_records'] == 2 and st['pieces'] == 6


def test_jsonl_bad_json_in_error_mode_names_the_file_and_line(tmp_path):
  p = tmp_path / 'r.jsonl'
  p.write_text('{"text": "a", "tld": 1, "kind": [1]}\n\n{"text": oops}\n')
  c = make_config(tmp_path, p, source='jsonl', bad_records='error')
  with pytest.raises(DataError, match=r'r.jsonl:3: not valid JSON'):
    next(data.train_iterator(c, data.build_tokenizer(c)))


def test_jsonl_missing_field_is_a_data_error_in_error_mode(tmp_path):
  c = jsonl_config(tmp_path, [{'text': 'abc', 'tld': 1}] * 4, bad_records='error')
  with pytest.raises(DataError, match=r"r.jsonl:[1-4]: no feature field 'kind'"):
    next(data.train_iterator(c, data.build_tokenizer(c)))


def test_text_source_rejects_extra_embeddings(tmp_path):
  c = make_config(tmp_path, write(tmp_path / 'a.txt', b'abc\n'))
  c.model.extra_embeddings = ml_collections.ConfigDict({'tld': 4})
  with pytest.raises(ConfigError, match='model.extra_embeddings'):
    data.validate(c)


def test_pipeline_split_records_reads_eval_files(tmp_path):
  tr, ev = write(tmp_path / 't.txt', b'a\nb\nc\n'), write(tmp_path / 'v.txt', b'x\ny\n')
  c = make_config(tmp_path, tr, eval_files=str(ev))
  src, ids = pipeline.split_records(c, 'eval')
  assert [src.read_raw([i])[0] for i in ids] == [b'x', b'y']


def test_jsonl_invalid_utf8_is_replaced_and_counted(tmp_path):
  p = tmp_path / 'r.jsonl'
  p.write_bytes(b'{"text": "ab\xffc"}\n' + b'{"text": "abc"}\n' * 7)
  c = make_config(tmp_path, p, source='jsonl')
  st = counts_after(c, n=1)
  assert st['invalid_utf8_records'] >= 1 and st['unk_tokens'] >= st['invalid_utf8_records']
