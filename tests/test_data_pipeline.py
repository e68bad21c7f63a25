"""End-to-end pipeline: batch contract, determinism, resume, workers, sharding, eval."""
import collections
import os

import ml_collections
import numpy as np
import pytest

from mlm_jax import data
from mlm_jax.data import pipeline
from mlm_jax.errors import ConfigError


def make_config(tmp_path, **data_overrides):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict(
      {'max_len': 64, 'vocab_size': 2048, 'extra_embeddings': ml_collections.ConfigDict()})
  c.train = ml_collections.ConfigDict({'batch_size': 16, 'grad_accum_steps': 1})
  c.data = data.defaults()
  c.data.cache_dir = str(tmp_path / 'cache')
  c.data.chunk_records = 64
  for k, v in data_overrides.items():
    c.data[k] = v
  return c


def char_config(tmp_path, lines, **overrides):
  path = tmp_path / 'corpus.txt'
  path.write_text('\n'.join(lines) + '\n')
  c = make_config(tmp_path, train_files=str(path), eval_files='', text_unit='line',
                  tokenizer='char', **overrides)
  c.model.vocab_size = data.build_tokenizer(_with_vocab(c)).vocab_size
  return c


def _with_vocab(c):
  c = ml_collections.ConfigDict(c.to_dict())
  c.model.vocab_size = data.CharTokenizer(c.data.alphabet).vocab_size
  return c


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def originals(batch):
  """input_ids with the masked positions restored from mlm_targets."""
  ids = batch['input_ids'].copy()
  r, s = np.nonzero(batch['mlm_weights'])
  ids[r, batch['mlm_positions'][r, s]] = batch['mlm_targets'][r, s]
  return ids


def record_texts(batch, tok):
  out = []
  ids = originals(batch)
  for row in range(len(ids)):
    for s in range(1, batch['segment_ids'][row].max() + 1):
      seg = ids[row][batch['segment_ids'][row] == s]
      out.append(tok.decode(seg[1:-1]))
  return out


@pytest.fixture(scope='module')
def shakespeare(tmp_path_factory):
  c = make_config(tmp_path_factory.mktemp('sh'))
  c.model.max_len = 128
  tok = data.build_tokenizer(c)
  return c, tok


def test_batch_contract(shakespeare):
  c, tok = shakespeare
  batch = next(data.train_iterator(c, tok))
  b, L, P = 16, 128, data.max_predictions(c)
  want = {'input_ids': (np.int32, (b, L)), 'segment_ids': (np.int32, (b, L)),
          'positions': (np.int32, (b, L)), 'token_type_ids': (np.int32, (b, L)),
          'mlm_positions': (np.int32, (b, P)), 'mlm_targets': (np.int32, (b, P)),
          'mlm_weights': (np.float32, (b, P))}
  assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
      k: (np.dtype(t), s) for k, (t, s) in want.items()}
  seg, pos, ids, orig = batch['segment_ids'], batch['positions'], batch['input_ids'], originals(batch)
  assert (batch['token_type_ids'] == 0).all()
  assert (seg > 0).mean() > 0.8  # packing fills rows
  for r in range(b):
    k = seg[r].max()
    # Segments are contiguous runs 1..k from the row start, then padding.
    np.testing.assert_array_equal(seg[r][seg[r] > 0], np.repeat(np.arange(1, k + 1),
                                                                np.bincount(seg[r])[1:]))
    assert (seg[r][np.argmin(seg[r] > 0):] == 0).all() or seg[r].min() > 0
    for s in range(1, k + 1):
      sl = seg[r] == s
      np.testing.assert_array_equal(pos[r][sl], np.arange(sl.sum()))  # positions restart
      assert orig[r][sl][0] == tok.cls_id and orig[r][sl][-1] == tok.sep_id
      assert ids[r][sl][0] == tok.cls_id and ids[r][sl][-1] == tok.sep_id  # never masked
    assert (ids[r][seg[r] == 0] == tok.pad_id).all() and (pos[r][seg[r] == 0] == 0).all()
  w = batch['mlm_weights']
  assert set(np.unique(w)) <= {0.0, 1.0} and w.sum() > 0
  r, s = np.nonzero(w)
  at = batch['mlm_positions'][r, s]
  assert (seg[r, at] > 0).all()
  assert not np.isin(batch['mlm_targets'][r, s], tok.special_ids).any()
  assert (batch['mlm_positions'][w == 0] == 0).all() and (batch['mlm_targets'][w == 0] == 0).all()
  # Used slots come first, positions increase within a row.
  assert (np.diff(w, axis=1) <= 0).all()
  masked = ids != orig
  assert masked.sum() <= w.sum()
  assert abs(w.sum() / (seg > 0).sum() - 0.15 * (1 - 2 / 60)) < 0.05


def test_same_config_same_batches_and_seed_matters(shakespeare):
  c, tok = shakespeare
  a = take(data.train_iterator(c, tok), 5)
  assert_same(a, take(data.train_iterator(c, tok), 5))
  c2 = ml_collections.ConfigDict(c.to_dict())
  c2.seed = 1
  b = take(data.train_iterator(c2, tok), 1)
  assert not np.array_equal(a[0]['input_ids'], b[0]['input_ids'])


def test_resume_from_state_continues_with_the_same_batches(shakespeare):
  c, tok = shakespeare
  full = take(data.train_iterator(c, tok), 8)
  it = data.train_iterator(c, tok)
  take(it, 3)
  state = it.get_state()
  assert state['shards']['0']['row'] > 0  # resuming inside a chunk is the interesting case
  it2 = data.train_iterator(c, tok)
  it2.set_state(state)
  assert_same(full[3:], take(it2, 5))


def test_epochs_repeat_with_a_new_order(tmp_path):
  lines = [f'rec{i:03d}' for i in range(40)]
  c = char_config(tmp_path, lines, packing=False, chunk_records=40, eval_fraction=0.0)
  c.train.batch_size = 40
  tok = data.build_tokenizer(c)
  it = data.train_iterator(c, tok)
  e0, e1 = (record_texts(b, tok) for b in take(it, 2))
  assert sorted(e0) == sorted(lines) == sorted(e1)
  assert e0 != e1


def test_workers_give_the_same_batches_and_states_are_portable(shakespeare):
  c, tok = shakespeare
  want = take(data.train_iterator(c, tok), 6)
  c2 = ml_collections.ConfigDict(c.to_dict())
  c2.data.num_workers = 2
  it = data.train_iterator(c2, tok)
  try:
    assert_same(want[:3], take(it, 3))
    state = it.get_state()
  finally:
    it.close()
  it0 = data.train_iterator(c, tok)  # resume the 2-worker run in-process
  it0.set_state(state)
  assert_same(want[3:], take(it0, 3))


def test_process_shards_are_disjoint_and_cover_the_split(tmp_path):
  lines = [f'rec{i:03d}' for i in range(64)]
  c = char_config(tmp_path, lines, packing=False, chunk_records=16, eval_fraction=0.0)
  c.train.batch_size = 32  # 16 rows per process = one chunk of short records
  tok = data.build_tokenizer(c)
  seen = []
  for p in range(2):
    it = data.train_iterator(c, tok, process_index=p, process_count=2)
    batches = take(it, 2)
    assert batches[0]['input_ids'].shape == (16, 64)
    seen.append(set(t for b in batches for t in record_texts(b, tok)))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(lines)


def test_global_batch_does_not_depend_on_the_process_count(tmp_path):
  lines = [f'rec{i:03d}' for i in range(200)]
  c = char_config(tmp_path, lines, packing=True, chunk_records=16, eval_fraction=0.0)
  c.train.batch_size = 16
  c.data.num_shards = 4
  tok = data.build_tokenizer(c)
  one = take(data.train_iterator(c, tok), 5)
  per_process = [data.train_iterator(c, tok, process_index=p, process_count=2) for p in range(2)]
  two = []
  for _ in range(5):
    a, b = next(per_process[0]), next(per_process[1])
    two.append({k: np.concatenate([a[k], b[k]]) for k in a})
  assert_same(one, two)
  # A state gathered from both processes resumes in one process (and the other way round).
  states = [it.get_state() for it in per_process]
  gathered = {'num_shards': 4, 'shards': {**states[0]['shards'], **states[1]['shards']}}
  resumed = data.train_iterator(c, tok)
  resumed.set_state(gathered)
  assert_same(take(data.train_iterator(c, tok), 8)[5:], take(resumed, 3))
  c.data.num_shards = 3
  with pytest.raises(ConfigError, match='data.num_shards'):
    data.train_iterator(c, tok, process_index=0, process_count=2)


def test_eval_batches_are_fixed_padded_and_cover_the_split(shakespeare):
  c, tok = shakespeare
  a, b = list(data.eval_batches(c, tok)), list(data.eval_batches(c, tok))
  assert_same(a, b)
  assert len(list(data.eval_batches(c, tok, max_batches=2))) == 2
  last = a[-1]
  assert last['input_ids'].shape == (16, 128)
  empty_rows = last['segment_ids'].max(axis=1) == 0
  assert empty_rows.any() and (last['mlm_weights'][empty_rows] == 0).all()
  # Two processes: same number of batches, their rows together are the 1-process batches.
  shards = [list(data.eval_batches(c, tok, process_index=p, process_count=2)) for p in range(2)]
  assert len(shards[0]) == len(shards[1]) == len(a)
  np.testing.assert_array_equal(
      np.concatenate([shards[0][0]['input_ids'], shards[1][0]['input_ids']]), a[0]['input_ids'])


def test_carved_eval_split_is_disjoint_from_train(tmp_path):
  lines = [f'line number {i}' for i in range(500)]
  c = char_config(tmp_path, lines, eval_fraction=0.2, test_fraction=0.1)
  ids = {name: set(pipeline.split_records(c, name)[1].tolist()) for name in ('train', 'eval', 'test')}
  assert not (ids['train'] & ids['eval'] or ids['train'] & ids['test'] or ids['eval'] & ids['test'])
  assert ids['train'] | ids['eval'] | ids['test'] == set(range(500))
  assert 60 < len(ids['eval']) < 140 and 20 < len(ids['test']) < 80
  tok = data.build_tokenizer(c)
  texts = collections.Counter(t for b in data.eval_batches(c, tok) for t in record_texts(b, tok))
  assert sorted(texts) == sorted(lines[i] for i in ids['eval'])


def test_max_records_limits_the_corpus(tmp_path):
  c = char_config(tmp_path, [f'r{i}' for i in range(100)], max_records=10, eval_fraction=0.5)
  assert len(pipeline.split_records(c, 'train')[1]) + len(pipeline.split_records(c, 'eval')[1]) == 10


def _pieces_of(batches, tok):
  """(content ids, chosen mask) of every packed piece, from the unmasked ids and the slots."""
  out = []
  for b in batches:
    ids = originals(b)
    chosen = np.zeros(ids.shape, bool)
    r, s = np.nonzero(b['mlm_weights'])
    chosen[r, b['mlm_positions'][r, s]] = True
    for row in range(len(ids)):
      for seg in range(1, b['segment_ids'][row].max() + 1):
        at = b['segment_ids'][row] == seg
        out.append((ids[row][at][1:-1], chosen[row][at][1:-1]))  # without [CLS] / [SEP]
  return out


def _words(ids, tok):
  """Brute force: word number of each token (-1 for special tokens). A word starts at a token
  that is not a '##' continuation, at the piece's first token, or after a special token."""
  word, out, prev_special = -1, [], True
  for i in ids.tolist():
    if i in tok.special_ids:
      out.append(-1)
      prev_special = True
      continue
    if prev_special or not tok.pieces[i].startswith('##'):
      word += 1
    out.append(word)
    prev_special = False
  return out


@pytest.mark.parametrize('mode', ['exact', 'bernoulli'])
def test_whole_word_masking_takes_whole_words(shakespeare, mode):
  c, tok = shakespeare
  c2 = ml_collections.ConfigDict(c.to_dict())
  c2.data.update(whole_word_mask=True, mask_mode=mode, max_predictions=c.model.max_len)  # no cap
  pieces = _pieces_of(take(data.train_iterator(c2, tok), 12), tok)
  words_total = words_chosen = 0
  continued = 0
  for ids, chosen in pieces:
    word = _words(ids, tok)
    members = collections.defaultdict(list)
    for t, w in enumerate(word):
      if w < 0:
        assert not chosen[t]  # special tokens are never chosen
      else:
        members[w].append(bool(chosen[t]))
    for flags in members.values():
      assert all(flags) or not any(flags), (tok.decode(ids), flags)  # a word is all or nothing
      continued += len(flags) > 1 and all(flags)
    words_total += len(members)
    words_chosen += sum(all(f) for f in members.values())
    n, k = sum(w >= 0 for w in word), int(chosen.sum())
    if mode == 'exact' and n:
      # Whole words until max(1, round(0.15 n)) tokens are reached: at least that many, and less
      # than that plus the longest chosen word.
      want = max(1, int(0.15 * n + 0.5))
      longest = max(len(f) for f in members.values() if all(f))
      assert want <= k < want + longest, (n, k, want, longest)
  assert len(pieces) > 300 and continued > 20  # multi-piece words were chosen, whole
  if mode == 'bernoulli':  # each word independently with probability mask_rate
    p = c.data.mask_rate
    assert abs(words_chosen - p * words_total) < 4.5 * (words_total * p * (1 - p)) ** 0.5


def test_bernoulli_masking_rate_through_the_pipeline(shakespeare):
  c, tok = shakespeare
  c2 = ml_collections.ConfigDict(c.to_dict())
  c2.data.update(mask_mode='bernoulli', max_predictions=c.model.max_len)  # no cap to bias it
  pieces = _pieces_of(take(data.train_iterator(c2, tok), 12), tok)
  n = sum(int((~np.isin(ids, tok.special_ids)).sum()) for ids, _ in pieces)
  k = sum(int(chosen.sum()) for _, chosen in pieces)
  p = c.data.mask_rate
  assert n > 10000 and abs(k - p * n) < 4.5 * (n * p * (1 - p)) ** 0.5
  # Unlike 'exact', the count per piece is not a function of its length.
  by_len = collections.defaultdict(set)
  for ids, chosen in pieces:
    by_len[len(ids)].add(int(chosen.sum()))
  assert sum(len(v) > 1 for v in by_len.values()) > 10


def test_tokenizer_round_trip_through_a_workdir(shakespeare, tmp_path):
  c, tok = shakespeare
  tok.save(str(tmp_path / 'tok'))
  tok2 = data.load_tokenizer(str(tmp_path / 'tok'))
  text = 'Before we proceed any further, hear me speak.'
  np.testing.assert_array_equal(tok.encode_batch([text])[0], tok2.encode_batch([text])[0])
  assert os.path.exists(tmp_path / 'tok' / 'vocab.txt')


def test_orbax_checkpoint_of_the_iterator(shakespeare, tmp_path):
  grain = pytest.importorskip('grain')
  ocp = pytest.importorskip('orbax.checkpoint')
  c, tok = shakespeare
  it = data.train_iterator(c, tok)
  take(it, 2)
  mngr = ocp.CheckpointManager(str(tmp_path / 'ckpt'), item_names=('ds',))
  mngr.save(2, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  want = take(it, 3)
  it2 = data.train_iterator(c, tok)
  mngr.restore(2, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointRestore(it2)))
  assert_same(want, take(it2, 3))
