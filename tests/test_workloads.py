"""The workloads: DomainBERT data (public-suffix split, TLD vocabulary, stratified split), event
sessions (structural/text token types, event types), and a short run of every config in configs/."""
import glob
import importlib.util
import json
import math
import os
import re

import numpy as np
import pytest

from mlm_jax import data
from mlm_jax.data import domains, events
from mlm_jax.errors import ConfigError
from tools import make_event_sessions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PSL_VECTORS = os.path.join(REPO, '..', 'shared', 'data', 'psl', 'test_psl.txt')
SHIPPED = os.path.join(REPO, 'mlm_jax', 'assets', 'domains', 'psl_private_domains.txt')


def load_config(name, variant=''):
  spec = importlib.util.spec_from_file_location(f'cfg_{name}', os.path.join(REPO, 'configs',
                                                                            f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


# ---------------------------------------------------------------- public suffix split

def test_psl_official_vectors():
  if not os.path.exists(PSL_VECTORS):
    pytest.skip(f'{PSL_VECTORS} not present')
  from publicsuffixlist import PublicSuffixList
  full = PublicSuffixList(only_icann=False, accept_unknown=True)
  icann = PublicSuffixList(only_icann=True, accept_unknown=True)
  checked = 0
  pattern = re.compile(r"^checkPublicSuffix\((null|'[^']*'), (null|'[^']*')\);")
  for line in open(PSL_VECTORS, encoding='utf-8'):
    m = pattern.match(line.strip())
    if not m or m.group(1) == 'null':
      continue
    name = m.group(1).strip("'")
    expected = None if m.group(2) == 'null' else m.group(2).strip("'").lower()
    got = domains.registrable_domain(name)
    if not name.startswith('.') and full.publicsuffix(name.lower()) != icann.publicsuffix(
        name.lower()):
      continue  # a PRIVATE-section rule (e.g. uk.com) decides: we split at ICANN suffixes only
    if expected is None:
      assert got is None, name  # a suffix alone, a leading dot, ...: never a record
    elif domains._psl().publicsuffix(expected) is None:
      # The vectors' default rule '*' accepts unlisted TLDs ('example.example'); we reject names
      # without a known ICANN suffix by design (counted as invalid records).
      assert got is None, name
    else:
      assert got == expected.encode('idna').decode('ascii'), name
    checked += 1
  assert checked >= 60


def test_split_name_parts():
  assert domains.split_name('WWW.Example.CO.UK.') == ('www.example', 'co.uk')
  assert domains.record_text('www.example', 'registrable') == 'example'
  assert domains.record_text('www.example', 'host') == 'www.example'
  assert domains.split_name('https://shop.example.com/a?b') == ('shop.example', 'com')
  for bad in ('co.uk', 'localhost', 'exa mple.com', 'foo.notatld', '-', ''):
    assert domains.split_name(bad) is None, bad


# ---------------------------------------------------------------- domain source

def domain_config(tmp_path, files, tld_vocab_size=512, **data_overrides):
  c = load_config('domainbert', 'tiny')
  c.model.extra_embeddings = {'tld': tld_vocab_size}
  c.data.update(train_files=files, tld_vocab_size=tld_vocab_size, cache_dir=str(tmp_path / 'cache'),
                **data_overrides)
  return c


@pytest.fixture(scope='module')
def domain_file(tmp_path_factory):
  """The shipped names plus invalid lines and a rare suffix."""
  path = tmp_path_factory.mktemp('domains') / 'names.txt'
  names = open(SHIPPED).read().split()
  names += ['not a domain', 'localhost', 'co.uk', 'rare-name.museum']
  path.write_text('\n'.join(names) + '\n')
  return str(path), len(names)


# Hand-worked: suffix counts com 3, co.uk 2, net 2, org 2, io 1 ('localhost' has none). The rule
# (domains.py): most frequent first, ties by name; tld_vocab_size 6 = pad + other + 4 suffixes.
HAND_NAMES = ['a.com', 'b.com', 'www.c.com', 'x.net', 'y.net', 'p.org', 'q.org', 'shop.z.co.uk',
              'w.co.uk', 'solo.io', 'localhost']
HAND_TLDS = ['com', 'co.uk', 'net', 'org']
HAND_IDS = {'com': 2, 'co.uk': 3, 'net': 4, 'org': 5, 'io': domains.OTHER_TLD}


def test_tld_vocabulary_hand_worked_and_independent_of_line_order(tmp_path):
  for seed in range(4):  # the same vocabulary whatever the order of the names
    names = list(np.random.default_rng(seed).permutation(HAND_NAMES)) if seed else HAND_NAMES
    path = tmp_path / f'names{seed}.txt'
    path.write_text('\n'.join(names) + '\n')
    c = domain_config(tmp_path, str(path), tld_vocab_size=6, eval_fraction=0.0, stratify_field='')
    tok = data.build_tokenizer(c)
    assert tok.tlds == HAND_TLDS, seed
    assert tok.tld_ids(list(HAND_IDS)).tolist() == list(HAND_IDS.values())
    source, ids = data.split_records(c, 'train')
    recs = source.with_tokenizer(tok).read(ids, __import__('collections').Counter())
    by_text = dict(zip(recs.texts, recs.features['tld']))
    assert by_text == {'a': 2, 'b': 2, 'c': 2, 'x': 4, 'y': 4, 'p': 5, 'q': 5, 'z': 3, 'w': 3,
                       'solo': 1}
  # Only the training split counts: eval names (here many .io ones) move nothing.
  ev = tmp_path / 'eval.txt'
  ev.write_text(''.join(f'n{i}.io\n' for i in range(20)))
  c = domain_config(tmp_path, str(tmp_path / 'names0.txt'), tld_vocab_size=6, eval_files=str(ev),
                    stratify_field='')
  assert data.build_tokenizer(c).tlds == HAND_TLDS
  c = domain_config(tmp_path, str(tmp_path / 'names0.txt'), tld_vocab_size=3, eval_fraction=0.0,
                    stratify_field='')
  assert data.build_tokenizer(c).tlds == ['com']  # the vocabulary size cuts the list


def test_tld_vocabulary_of_the_shipped_names_by_brute_force(domain_file, tmp_path):
  path, _ = domain_file
  c = domain_config(tmp_path, path)
  tok = data.build_tokenizer(c)
  _, train = data.split_records(c, 'train')
  lines = open(path).read().split('\n')[:-1]
  counts = __import__('collections').Counter(
      parts[1] for parts in (domains.split_name(lines[i]) for i in train.tolist()) if parts)
  want = sorted(counts, key=lambda t: (-counts[t], t))[:c.data.tld_vocab_size - 2]
  assert tok.tlds == want and len(want) > 20
  tok.save(str(tmp_path / 'tok'))
  back = data.load_tokenizer(str(tmp_path / 'tok'))
  assert isinstance(back, domains.DomainTokenizer) and back.tlds == tok.tlds
  assert back.fingerprint() == tok.fingerprint()
  assert tok.vocab_size == 5 + len('abcdefghijklmnopqrstuvwxyz0123456789-.')


def test_rare_suffixes_share_the_other_id_and_invalid_lines_are_counted(domain_file, tmp_path):
  path, n = domain_file
  c = domain_config(tmp_path, path, tld_vocab_size=4, eval_fraction=0.0, stratify_field='')
  tok = data.build_tokenizer(c)
  assert tok.tlds == ['com', 'net']  # ids 2, 3; everything else -> 1
  source, ids = data.split_records(c, 'train')
  source.with_tokenizer(tok)
  counts = __import__('collections').Counter()
  recs = source.read(ids, counts)
  # 'not a domain', 'localhost', 'co.uk': bad records, reported with their position and why.
  assert [(int(ids[k]), why.split(':')[0]) for k, why in recs.bad] == [
      (n - 4 + j, 'not a host name with a known public suffix') for j in range(3)]
  assert len(recs.texts) == n - 3
  by_text = dict(zip(recs.texts, recs.features['tld']))
  assert by_text['rare-name'] == domains.OTHER_TLD
  suffixes = [domains.split_name(l)[1] for l in open(path).read().split('\n') if l
              and domains.split_name(l)]
  expected = [{'com': 2, 'net': 3}.get(s, 1) for s in suffixes]
  assert recs.features['tld'] == expected
  batch = next(iter(data.eval_batches(c, tok, split_name='train', max_batches=1)))
  real = batch['segment_ids'] > 0
  assert set(np.unique(batch['tld'][real])) <= {1, 2, 3} and (batch['tld'][~real] == 0).all()
  assert (batch['input_ids'] != tok.unk_id).all()


def test_stratified_split_is_disjoint_stable_and_per_suffix(domain_file, tmp_path):
  path, n = domain_file
  c = domain_config(tmp_path, path, eval_fraction=0.02, stratify_field='tld')
  _, train = data.split_records(c, 'train')
  source, ev = data.split_records(c, 'eval')
  assert len(np.intersect1d(train, ev)) == 0 and len(train) + len(ev) == n
  _, ev2 = data.split_records(c, 'eval')
  np.testing.assert_array_equal(ev, ev2)
  hash_N, suffix_N, names = source.parsed()
  in_eval = np.zeros(n, bool)
  in_eval[ev] = True
  checked = 0
  for code in np.unique(suffix_N[suffix_N >= 0]):  # brute force, suffix by suffix
    members = sorted(np.flatnonzero(suffix_N == code).tolist(), key=lambda i: int(hash_N[i]))
    share = __import__('fractions').Fraction(2, 100) * len(members)
    got = [bool(in_eval[i]) for i in members]
    # The documented rule: the round(0.02 * size) names with the lowest hashes go to eval.
    k = sum(got)
    assert got == [True] * k + [False] * (len(members) - k), names[code]
    if share.denominator == 2:  # a tie: either neighbour
      assert k in (int(share), int(share) + 1), names[code]
    else:
      assert k == round(share), names[code]
      checked += k > 0
  assert checked >= 3  # the big suffixes (com, net, org, ...) carry a share
  # Appending names of a new suffix moves no existing name between splits of other suffixes.
  more = tmp_path / 'more.txt'
  more.write_text(open(path).read() + 'a.example.travel\nb.example.travel\n')
  _, ev3 = data.split_records(domain_config(tmp_path, str(more), eval_fraction=0.02,
                                            stratify_field='tld'), 'eval')
  np.testing.assert_array_equal(ev, ev3[ev3 < n])


def test_csv_column_and_host_part(tmp_path):
  p = tmp_path / 'ranks.csv'
  p.write_text('rank,domain\n1,www.google.com\n2,"mail.example.co.uk"\n3,bad name\n')
  c = domain_config(tmp_path, str(p), domain_column='domain', domain_part='host',
                    eval_fraction=0.0, stratify_field='')
  tok = data.build_tokenizer(c)
  source, ids = data.split_records(c, 'train')
  counts = __import__('collections').Counter()
  recs = source.with_tokenizer(tok).read(ids, counts)
  assert recs.texts == ['www.google', 'mail.example']
  assert [k for k, _ in recs.bad] == [3]  # record 0 is the header: neither data nor bad
  assert [tok.tld_name(i) for i in recs.features['tld']] == ['com', 'co.uk']


def test_domain_config_is_validated(tmp_path):
  c = domain_config(tmp_path, SHIPPED)
  c.model.extra_embeddings = {'tld': 100}
  with pytest.raises(ConfigError, match='extra_embeddings'):
    data.validate(c)


# ---------------------------------------------------------------- event sessions

@pytest.fixture(scope='module')
def sessions_file(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('events') / 'sessions.jsonl')
  make_event_sessions.write(path, 300, seed=1)
  return path


def test_shipped_event_sample_is_the_generator_output(tmp_path):
  """configs/event_bert.py's default data is what its LICENSE.md says made it."""
  assets = os.path.join(REPO, 'mlm_jax', 'assets', 'events')
  c = load_config('event_bert')
  for name, n, seed in (('train.jsonl', 400, 0), ('valid.jsonl', 50, 1)):
    make_event_sessions.write(str(tmp_path / name), n, seed)
    assert (tmp_path / name).read_bytes() == open(os.path.join(assets, name), 'rb').read(), name
    assert f'--out mlm_jax/assets/events/{name} --sessions {n} --seed {seed}' in open(
        os.path.join(assets, 'LICENSE.md')).read()
  assert c.data.train_files == '{assets}/events/train.jsonl'
  assert c.data.eval_files == '{assets}/events/valid.jsonl'
  assert os.path.getsize(os.path.join(assets, 'train.jsonl')) < 300_000


def test_session_generator_is_deterministic(tmp_path):
  a, b = tmp_path / 'a.jsonl', tmp_path / 'b.jsonl'
  make_event_sessions.write(str(a), 50, 7)
  make_event_sessions.write(str(b), 50, 7)
  assert a.read_bytes() == b.read_bytes()
  kinds = {e['type'] for s in events.read_sessions(str(a)) for e in s['events']}
  assert kinds == {'search', 'view', 'add_to_cart', 'purchase'}


@pytest.mark.parametrize('event_types', [['search', 'view'],
                                         ['search', 'view', 'add_to_cart', 'purchase', 'a', 'b']])
def test_session_tokens_types_and_event_types(event_types):
  vocab = os.path.join(REPO, 'mlm_jax', 'assets', 'events', 'vocab.txt')
  tok = events.SessionTokenizer(vocab, event_types)
  assert tok.text_offset == 5 + len(event_types)  # the boundary moves with the types
  session = [{'type': 'search', 'text': 'wireless headphones'}, {'type': 'view', 'text': 'sony x'},
             {'type': 'unknown', 'text': 'dropped'}, {'type': 'view'}]
  counts = __import__('collections').Counter()
  (ids,), (feats,) = tok.encode_sessions([session], counts)
  assert counts['invalid_events'] == 1
  text_ids = tok.text.encode_batch(['wireless headphones', 'sony x'])
  expected = ([tok.type_token['search']] + list(text_ids[0] + tok.text_offset)
              + [tok.type_token['view']] + list(text_ids[1] + tok.text_offset)
              + [tok.type_token['view']])
  assert ids.tolist() == expected
  assert feats.tolist() == ([1] * (1 + len(text_ids[0])) + [2] * (2 + len(text_ids[1])))
  assert tok.decode(ids) == '[E:search] wireless headphones [E:view] sony x [E:view]'
  types = tok.token_type_V[ids]
  assert types.tolist() == [0] + [1] * len(text_ids[0]) + [0] + [1] * len(text_ids[1]) + [0]
  # Event tokens are never masked nor drawn as random replacements.
  assert set(tok.type_token.values()) <= set(tok.special_ids.tolist())
  assert not set(tok.type_token.values()) & set(tok.normal_ids.tolist())


def test_session_batches(sessions_file, tmp_path):
  c = load_config('event_bert')
  c.data.update(train_files=sessions_file, cache_dir=str(tmp_path), mask_rate=0.3)
  c.model.max_len = 64
  tok = data.build_tokenizer(c)
  batch = next(iter(data.eval_batches(c, tok, split_name='train', max_batches=1)))
  w = batch['mlm_weights'] > 0
  rows = np.nonzero(w)[0]
  ids = batch['input_ids'].copy()
  ids[rows, batch['mlm_positions'][w]] = batch['mlm_targets'][w]  # before masking
  real = batch['segment_ids'] > 0
  is_text = ids >= tok.text_offset
  np.testing.assert_array_equal(batch['token_type_ids'], (real & is_text).astype(np.int32))
  assert (batch['mlm_targets'][w] >= tok.text_offset).all()  # only text tokens are predicted
  assert (batch['token_type_ids'][rows, batch['mlm_positions'][w]] == 1).all()
  is_event = (ids >= 5) & (ids < tok.text_offset)
  assert is_event.any()
  np.testing.assert_array_equal(batch['event_type'][is_event], ids[is_event] - 4)  # [E:t] -> t+1
  assert (batch['event_type'][real & ~np.isin(ids, [tok.cls_id, tok.sep_id])] > 0).all()
  assert (batch['event_type'][~real] == 0).all()
  tok.save(str(tmp_path / 'tok'))
  back = data.load_tokenizer(str(tmp_path / 'tok'))
  assert back.fingerprint() == tok.fingerprint() and back.text_offset == tok.text_offset


# ---------------------------------------------------------------- every config trains

def _shrink(c):
  c.model.update(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64,
                 max_len=min(c.model.max_len, 32), scan_layers=False, dtype='float32')
  c.train.update(steps=5, batch_size=8 * c.train.grad_accum_steps,  # micro-batches of 8
                 log_every=5, eval_every=5, eval_steps=1, progress_bar=False)
  c.optimizer.warmup_steps = 1
  c.checkpoint.update(every=5, async_save=False)
  c.data.update(num_workers=0, chunk_records=256)
  return c


def _smoke_configs(sessions):
  shipped_vocab = dict(vocab_path='{assets}/shakespeare/vocab.txt', train_files=
                       '{assets}/shakespeare/train.txt', eval_files='{assets}/shakespeare/valid.txt')
  out = {}
  out['quickstart'] = load_config('quickstart')
  out['domainbert:tiny'] = load_config('domainbert', 'tiny')
  out['domainbert'] = load_config('domainbert')
  out['domainbert'].data.eval_fraction = 0.02  # the shipped 3.4k names: 0.1% is ~3 names
  out['mini_bert'] = load_config('mini_bert')
  out['event_bert'] = load_config('event_bert')  # runs on its shipped sample, as is
  out['modernbert_base:tiny'] = load_config('modernbert_base', 'tiny')
  for name in ('bert_base', 'bert_large', 'modernbert_base'):
    c = load_config(name)
    c.data.update(**shipped_vocab)
    c.model.vocab_size = 2048
    out[name] = c
  return out


def test_every_config_is_covered():
  shipped = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, 'configs', '*.py'))}
  covered = {name.split(':')[0] for name in _smoke_configs('x')}
  assert shipped - {'__init__'} <= covered


@pytest.mark.parametrize('name', ['quickstart', 'domainbert:tiny', 'domainbert', 'mini_bert',
                                  'event_bert', 'bert_base', 'bert_large', 'modernbert_base',
                                  'modernbert_base:tiny'])
def test_config_trains_five_steps(name, sessions_file, tmp_path):
  from mlm_jax import train
  c = _shrink(_smoke_configs(sessions_file)[name])
  c.data.cache_dir = str(tmp_path / 'cache')
  c.train.log_every = 1
  workdir = str(tmp_path / 'run')
  out = train.train_and_evaluate(c, workdir)
  assert out['step'] == 5
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  losses = [r['train/loss'] for r in rows if 'train/loss' in r]
  assert len(losses) == 5 and all(math.isfinite(x) for x in losses + [out['eval/loss']])
  # A fresh BERT (weights ~N(0, 0.02), decoder tied to the embeddings) predicts almost uniformly:
  # its first loss is log V. Far from it means a broken head, loss or target layout.
  assert abs(losses[0] - math.log(c.model.vocab_size)) < 0.25, (losses[0], c.model.vocab_size)
  tok = data.load_tokenizer(os.path.join(workdir, 'tokenizer'))
  # The eval's denominator is every real prediction slot of its batches, counted here from the
  # batches themselves.
  slots = sum(float(b['mlm_weights'].sum()) for b in data.eval_batches(c, tok, max_batches=1))
  assert out['eval/masked_tokens'] == slots > 0
  assert tok.vocab_size == c.model.vocab_size
  saved = json.load(open(os.path.join(workdir, 'config.json')))
  assert saved['model']['extra_embeddings'] == dict(c.model.extra_embeddings)
  if name.startswith('domainbert'):
    assert os.path.exists(os.path.join(workdir, 'tokenizer', domains.TLD_FILE))


def test_predict_reads_a_domain_like_training_does(domain_file, tmp_path):
  """predict splits 'exam[MASK]le.com' into the label the model reads and the TLD id."""
  from mlm_jax import model as model_lib
  from mlm_jax import predict
  path, _ = domain_file
  c = domain_config(tmp_path, path)
  predictor = predict.Predictor.__new__(predict.Predictor)  # no checkpoint needed for the input
  predictor.config, predictor.tokenizer = c.to_dict(), data.build_tokenizer(c)
  predictor.cfg = model_lib.BertConfig.from_config(c.model, 'float32')
  batch, slots = predictor.batch(['exam[MASK]le.com', 'www.a[MASK].co.uk'])
  tok = predictor.tokenizer
  row0 = batch['input_ids'][0][batch['segment_ids'][0] > 0]
  assert tok.decode(row0[1:-1]).replace(tok.decode([tok.mask_id]), '?') in ('exam?le', 'exam ? le')
  assert batch['tld'][0, 0] == tok.tld_ids(['com'])[0] and batch['tld'][1, 0] == tok.tld_ids(['co.uk'])[0]
  assert list(slots[0]) == [5]  # [CLS] e x a m [MASK]
  # Written as users write them: upper case, a trailing dot, a URL. The model reads the same.
  for spelled in ('EXAM[MASK]LE.COM.', 'https://exam[MASK]le.com/path', 'www.exam[MASK]le.com'):
    again, again_slots = predictor.batch([spelled])
    assert (again['input_ids'][0] == batch['input_ids'][0]).all(), spelled
    assert again['tld'][0, 0] == batch['tld'][0, 0] and list(again_slots[0]) == [5]
