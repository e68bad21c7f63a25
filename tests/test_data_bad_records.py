"""Malformed records of every source are counted and skipped (data.bad_records='skip'), stop the
run at the first one naming file:line ('error'), or stop it when too many are bad
(data.max_bad_fraction); skipping is a pure function of the record, so batches stay the same for
any worker count and across a resume."""
import collections
import json
import logging
import os
import re
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from mlm_jax import data
from mlm_jax.data import domains, events, sources, stats, tfds_source
from mlm_jax.errors import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAD_JSON, NO_TEXT, TEXT_IS_INT = '{"text": oops}', '{"txt": "no text field"}', '{"text": 17}'


def good(i):
  return json.dumps({'text': f'record {i}'})


def write_lines(path, lines):
  path.write_text(''.join(line + '\n' for line in lines))
  return str(path)


def corpus(tmp_path, n_good, bad_at, name='r.jsonl'):
  """n_good good JSONL lines with bad lines inserted so that they sit at the 1-based file lines
  of `bad_at` {line: text}. Returns (path, good texts in file order)."""
  lines, texts, i = [], [], 0
  while i < n_good or len(lines) + 1 in bad_at:
    if len(lines) + 1 in bad_at:
      lines.append(bad_at[len(lines) + 1])
    else:
      lines.append(good(i))
      texts.append(f'record {i}')
      i += 1
  return write_lines(tmp_path / name, lines), texts


def make_config(tmp_path, train_files, **overrides):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict(
      {'max_len': 32, 'vocab_size': 0, 'extra_embeddings': ml_collections.ConfigDict()})
  c.train = ml_collections.ConfigDict({'batch_size': 8, 'grad_accum_steps': 1})
  c.data = data.defaults()
  c.data.update(source='jsonl', train_files=train_files, eval_files='', eval_fraction=0.0,
                text_unit='line', tokenizer='char', cache_dir=str(tmp_path / 'cache'),
                chunk_records=100)
  c.data.update(overrides)
  c.model.vocab_size = data.CharTokenizer(c.data.alphabet).vocab_size
  return c


def record_texts(batches, tok):
  """Every packed record of the batches, decoded from the unmasked ids."""
  out = []
  for b in batches:
    ids = b['input_ids'].copy()
    r, s = np.nonzero(b['mlm_weights'])
    ids[r, b['mlm_positions'][r, s]] = b['mlm_targets'][r, s]
    for row in range(len(ids)):
      for seg in range(1, b['segment_ids'][row].max() + 1):
        out.append(tok.decode(ids[row][b['segment_ids'][row] == seg][1:-1]))
  return out


def test_every_kind_of_malformed_jsonl_record_is_dropped_with_its_reason(tmp_path):
  lines = ['{"text": "ok", "tld": 3, "kind": 0}', BAD_JSON, '[1, 2]', NO_TEXT, TEXT_IS_INT, '{"text": [5, 6]}',
           '{"text": "a", "tld": 1}', '{"text": "b", "tld": 1, "kind": "x"}',
           '{"text": "c", "tld": true, "kind": 1}', '{"text": "d", "tld": 2, "kind": [1, 1]}',
           '[' * 100_000 + ']' * 100_000]
  path = write_lines(tmp_path / 'r.jsonl', lines)
  c = make_config(tmp_path, path)
  c.model.extra_embeddings = ml_collections.ConfigDict({'tld': 8, 'kind': 4})
  source, ids = data.split_records(c, 'train')
  assert source.kind == 'text'  # what the first record holds
  recs = source.read(ids, collections.Counter())
  assert recs.keep_N.tolist() == [0, 9] and recs.texts == ['ok', 'd']
  assert recs.features['tld'] == [3, 2]
  why = dict(recs.bad)
  assert sorted(why) == [1, 2, 3, 4, 5, 6, 7, 8, 10]
  expected = {1: 'not valid JSON', 2: 'not a JSON object', 3: "no 'text' field",
              4: "'text' must be a string or a list of token ids, got 17",
              5: "'text' holds token ids, but this corpus holds text",
              6: "no feature field 'kind'", 7: "feature 'kind' must be an int or a list of ints",
              8: "feature 'tld' must be an int", 10: 'not valid JSON'}
  for k, text in expected.items():
    assert why[k].startswith(text), (k, why[k])
  assert all('\n' not in w for w in why.values())


def test_a_corpus_with_bad_lines_trains_and_counts_them(tmp_path, caplog):
  bad_at = {11: BAD_JSON, 21: NO_TEXT, 31: TEXT_IS_INT}
  path, texts = corpus(tmp_path, 997, bad_at)
  c = make_config(tmp_path, path, chunk_records=1000)  # a chunk is exactly one epoch
  tok = data.build_tokenizer(c)
  # One pass in corpus order: every good record comes out once, no bad one.
  st = stats.Stats('walk')
  walked = list(data.eval_batches(c, tok, split_name='train', stats_=st))
  assert sorted(record_texts(walked, tok)) == sorted(texts)
  assert st.counts['records'] == 1000 and st.counts['bad_records'] == 3
  real = sum(int((b['segment_ids'] > 0).sum()) for b in walked)
  assert real == sum(len(t) + 2 for t in texts)  # [CLS] text [SEP] per good record, brute force
  # The train iterator with its own stats: counted, logged with file and line, training goes on.
  caplog.clear()
  it = data.train_iterator(c, tok)
  with caplog.at_level(logging.WARNING):
    batches = [next(it) for _ in range(300)]  # > 2 epochs of ~125 rows of 8
  counts = it.stats.counts
  assert counts['records'] >= 2000 and counts['records'] % 1000 == 0
  assert counts['bad_records'] * 1000 == 3 * counts['records']
  assert set(record_texts(batches, tok)) == set(texts)
  shown = [r.getMessage() for r in caplog.records if 'skipped bad record' in r.getMessage()]
  assert sorted(re.search(r'r\.jsonl:(\d+)', m).group(1) for m in shown) == ['11', '21', '31']
  assert any(f'{path}:11: not valid JSON' in m for m in shown)


def test_only_the_first_five_bad_records_are_logged(tmp_path, caplog):
  path, _ = corpus(tmp_path, 995, {k: BAD_JSON for k in range(100, 108)})
  c = make_config(tmp_path, path, chunk_records=1003)
  it = data.train_iterator(c, data.build_tokenizer(c))
  with caplog.at_level(logging.WARNING):
    for _ in range(150):
      next(it)
  shown = [r.getMessage() for r in caplog.records if 'skipped bad record' in r.getMessage()]
  assert len(shown) == 5 and len(set(shown)) == 5 and 'only counted' in shown[-1]
  assert it.stats.counts['bad_records'] >= 8


def test_error_mode_stops_at_the_bad_record_naming_file_and_line(tmp_path):
  path, _ = corpus(tmp_path, 50, {7: NO_TEXT})
  c = make_config(tmp_path, path, bad_records='error')
  with pytest.raises(DataError, match=re.escape(f"{path}:7: no 'text' field")) as e:
    next(data.train_iterator(c, data.build_tokenizer(c)))
  assert '\n' not in str(e.value)
  c.data.bad_records = 'skip'
  next(data.train_iterator(c, data.build_tokenizer(c)))


def test_too_many_bad_records_stop_with_one_line_naming_the_file(tmp_path):
  path, _ = corpus(tmp_path, 969, {k: BAD_JSON for k in range(1, 1001, 33)})  # 31 bad: 3.1%
  c = make_config(tmp_path, path, chunk_records=250)
  tok = data.build_tokenizer(c)
  it = data.train_iterator(c, tok)
  with pytest.raises(DataError) as e:
    for _ in range(1000):
      next(it)
  msg = str(e.value)
  assert msg.startswith(f'{path}: 31 of the 1000 records read are bad (3.1%') and '\n' not in msg
  assert 'data.max_bad_fraction=0.01' in msg
  assert re.search(re.escape(f'the first: {path}:') + r'\d+: not valid JSON', msg)
  assert it.stats.counts['records'] == 1000  # checked as soon as 1000 were read, not before
  c.data.max_bad_fraction = 0.05  # allowed: trains on
  it = data.train_iterator(c, tok)
  for _ in range(600):
    next(it)
  assert it.stats.counts['records'] >= 4000


def test_a_few_bad_records_below_the_fraction_never_stop_a_run(tmp_path):
  path, _ = corpus(tmp_path, 995, {k: TEXT_IS_INT for k in (1, 2, 3, 4, 5)})  # 0.5%
  c = make_config(tmp_path, path, chunk_records=10)
  it = data.train_iterator(c, data.build_tokenizer(c))
  for _ in range(400):
    next(it)
  assert it.stats.counts['records'] > 2000


def test_a_corpus_of_nothing_but_bad_records_stops_instead_of_spinning(tmp_path):
  path = write_lines(tmp_path / 'r.jsonl', [BAD_JSON] * 40)
  c = make_config(tmp_path, path, max_bad_fraction=1.0, chunk_records=16)
  tok = data.build_tokenizer(c)
  with pytest.raises(DataError, match=re.escape(path) + ': no record of the train split gives'):
    next(data.train_iterator(c, tok))
  c.data.update(eval_files=path)
  with pytest.raises(DataError, match='no record of the eval split gives any token'):
    next(iter(data.eval_batches(c, tok)))


def test_bad_records_skip_the_same_way_for_any_worker_count_and_after_resume(tmp_path):
  bad = {k: [BAD_JSON, NO_TEXT, TEXT_IS_INT][k % 3] for k in range(5, 400, 41)}
  path, _ = corpus(tmp_path, 390, bad)
  c = make_config(tmp_path, path, chunk_records=64, max_bad_fraction=0.05)
  tok = data.build_tokenizer(c)
  it = data.train_iterator(c, tok)
  want = [next(it) for _ in range(40)]
  assert it.stats.counts['bad_records'] > 0
  c2 = ml_collections.ConfigDict(c.to_dict())
  c2.data.num_workers = 2
  it2 = data.train_iterator(c2, tok)
  try:
    got = [next(it2) for _ in range(20)]
    state = it2.get_state()
  finally:
    it2.close()
  resumed = data.train_iterator(c, tok)  # the 2-worker run continues in-process
  resumed.set_state(state)
  got += [next(resumed) for _ in range(20)]
  for a, b in zip(want, got):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_text_invalid_utf8_skipped_is_a_bad_record(tmp_path):
  path = tmp_path / 't.txt'
  path.write_bytes(b'ok one\n' * 3 + b'bad \xff\n' + b'ok two\n' * 3)
  c = make_config(tmp_path, str(path), source='text', invalid_utf8='skip', packing=False,
                  chunk_records=7)
  c.train.batch_size = 6  # one chunk
  it = data.train_iterator(c, data.build_tokenizer(c))
  next(it)
  assert it.stats.counts['bad_records'] == 1 and it.stats.counts['invalid_utf8_records'] == 1
  c.data.invalid_utf8 = 'replace'  # repaired, so not bad
  it = data.train_iterator(c, data.build_tokenizer(c))
  next(it)
  assert it.stats.counts['bad_records'] == 0 and it.stats.counts['invalid_utf8_records'] == 1
  c.data.update(invalid_utf8='skip', bad_records='error')
  with pytest.raises(DataError, match=re.escape(f'{path}:4: invalid UTF-8')):
    next(data.train_iterator(c, data.build_tokenizer(c)))


def test_domain_lines_that_are_no_names_are_bad_records(tmp_path):
  path = write_lines(tmp_path / 'names.txt', ['example.com', 'shop.example.co.uk', 'localhost',
                                               'not a name', 'mail.example.org'] * 3)
  c = make_config(tmp_path, path, source='domains', alphabet=data.config.DOMAIN_ALPHABET,
                  tld_vocab_size=8, packing=False, chunk_records=15)
  c.model.extra_embeddings = ml_collections.ConfigDict({'tld': 8})
  c.model.vocab_size = data.CharTokenizer(c.data.alphabet).vocab_size
  tok = data.build_tokenizer(c)
  it = data.train_iterator(c, tok)
  next(it)
  assert it.stats.counts['records'] == 15 and it.stats.counts['bad_records'] == 6
  c.data.bad_records = 'error'
  with pytest.raises(DataError, match=re.escape(f"{path}:") + r'(3|4|8|9|13|14): not a host name'):
    next(data.train_iterator(c, tok))
  # Bad lines are split by their own text, not all into one split.
  hashes, _ = domains.DomainSource([path], str(tmp_path / 'cache'), 'registrable', '').split_keys(
      '', '')
  assert len(set(hashes[[2, 3]].tolist())) == 2 and (hashes[[2, 3]] != 0).all()


def test_event_lines_without_a_session_are_bad_records(tmp_path):
  session = {'events': [{'type': 'search', 'text': 'red shoes'}, {'type': 'nope', 'text': 'x'}]}
  lines = [json.dumps(session)] * 4 + [BAD_JSON, '{"events": "not a list"}', '{"session": 1}']
  path = write_lines(tmp_path / 's.jsonl', lines)
  c = make_config(tmp_path, path, source='events', tokenizer='session', text_field='events',
                  vocab_path='{assets}/events/vocab.txt', packing=False, chunk_records=7)
  c.train.batch_size = 4  # one chunk
  c.model.extra_embeddings = ml_collections.ConfigDict({'event_type': 5})
  tok = events.build_tokenizer(c)
  c.model.vocab_size = tok.vocab_size
  it = data.train_iterator(c, tok)
  next(it)
  counts = it.stats.counts
  assert counts['bad_records'] == 3 and counts['invalid_events'] == 4 and counts['pieces'] == 4
  c.data.bad_records = 'error'
  with pytest.raises(DataError, match=re.escape(path) + r':(5|6|7): '):
    next(data.train_iterator(c, tok))


class _FakeTfds:
  def __init__(self, rows):
    self.rows = rows

  def __len__(self):
    return len(self.rows)

  def __getitems__(self, ids):
    return [self.rows[i] for i in ids]


def test_tfds_records_without_the_text_field_are_bad_records():
  rows = [{'text': b'abc', 'tld': np.int64(1)}, {'tld': np.int64(2)},
          {'text': b'ab\xff', 'tld': np.int64(1)}, {'text': b'ok', 'tld': np.array([1, 2])}]
  src = tfds_source.TfdsSource.__new__(tfds_source.TfdsSource)
  src.__dict__.update(args=('fake', 'train', None), text_field='text', feature_names=('tld',),
                      name='tfds:fake[train]', n=len(rows), _ds=_FakeTfds(rows), _kind=None,
                      invalid_utf8='skip', metadata={})
  counts = collections.Counter()
  recs = src.read(np.arange(4), counts)
  assert recs.texts == ['abc', 'ok'] and recs.keep_N.tolist() == [0, 3]
  assert [(k, w.split(' (')[0]) for k, w in recs.bad] == [(1, "no 'text' field"),
                                                          (2, 'invalid UTF-8')]
  assert counts['invalid_utf8_records'] == 1 and src.where(1) == 'tfds:fake[train] record 1'
  assert isinstance(recs.features['tld'][0], int) and recs.features['tld'][1].tolist() == [1, 2]


def test_split_keys_survive_bad_records(tmp_path):
  path, _ = corpus(tmp_path, 6, {2: BAD_JSON, 4: '{"text": "x"}'})
  src = sources.JsonlSource([path], str(tmp_path / 'cache'), 'text', [])
  hashes, strata = src.split_keys('id', 'group')  # no record has either field
  assert len(set(hashes.tolist())) == 8 and (hashes != 0).all()
  assert strata[1] != strata[0] and len(set(strata[[0, 2, 3, 4]].tolist())) == 1


def test_cli_trains_through_a_jsonl_corpus_with_bad_lines(tmp_path):
  lines = [line for line in open(os.path.join(REPO, 'mlm_jax', 'assets', 'shakespeare',
                                              'train.txt')).read().split('\n') if line.strip()]
  rows = [json.dumps({'text': line}) for line in lines[:600]]
  rows[10:10] = [BAD_JSON, NO_TEXT, TEXT_IS_INT]  # 0.5%: below the default max_bad_fraction
  path = write_lines(tmp_path / 'bad.jsonl', rows)
  workdir = str(tmp_path / 'run')
  cmd = [sys.executable, '-m', 'mlm_jax.main', '--config=configs/quickstart.py',
         f'--workdir={workdir}', '--config.data.source=jsonl', f'--config.data.train_files={path}',
         '--config.train.steps=3', '--config.train.eval_every=0',
         '--config.optimizer.warmup_steps=1', f'--config.data.cache_dir={tmp_path}/cache',
         '--config.train.progress_bar=False']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'skipped bad record' in proc.stderr and f'{path}:' in proc.stderr
  assert os.listdir(os.path.join(workdir, 'checkpoints'))


def test_empty_text_of_either_kind_is_an_empty_record_not_a_bad_one(tmp_path):
  for lines, kind in (([good(0), '{"text": []}', '{"text": ""}'], 'text'),
                      (['{"text": []}', '{"text": [7, 8]}', '{"text": ""}', '{"text": "x"}'], 'ids')):
    path = write_lines(tmp_path / f'{kind}.jsonl', lines)
    src = sources.JsonlSource([path], str(tmp_path / 'cache'), 'text', [])
    recs = src.read(np.arange(len(lines)), collections.Counter())
    assert src.kind == kind
    if kind == 'text':
      assert recs.texts == ['record 0', '', ''] and not recs.bad
    else:
      assert [t.tolist() for t in recs.token_ids] == [[], [7, 8], []]
      assert [k for k, _ in recs.bad] == [3]  # text in a pre-tokenized corpus


def test_ids_that_do_not_fit_are_bad_records_not_crashes(tmp_path):
  lines = ['{"text": [5, 6], "tld": 1}', '{"text": [5, 99999999999], "tld": 1}',
           '{"text": [5], "tld": [99999999999]}', '{"text": [5], "tld": 99999999999}',
           '{"text": [5, -1], "tld": 1}', '{"text": [50000], "tld": 1}']
  path = write_lines(tmp_path / 'ids.jsonl', lines)
  c = make_config(tmp_path, path, packing=False, chunk_records=6, bad_records='skip')
  c.model.extra_embeddings = ml_collections.ConfigDict({'tld': 4})
  c.train.batch_size = 1
  it = data.train_iterator(c, data.build_tokenizer(c))
  batch = next(it)
  assert it.stats.counts['bad_records'] == 5 and it.stats.counts['pieces'] == 1
  assert batch['segment_ids'].sum() == 4  # [CLS] 5 6 [SEP]
