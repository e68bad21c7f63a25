"""Exports outside mlm_jax: DomainBERT and the event-session BERT in transformers (extra embeddings
folded into token types, tokenizer.json, mlm_inputs.py), the model card, and the StableHLO artifact
run in a fresh process with only jax and numpy.

Two tiny runs are shared by the module: DomainBERT (configs/domainbert.py:tiny, shrunk) and the
event-session BERT (configs/event_bert.py, shrunk, unpacked rows).
"""
import ast
import importlib.util
import json
import os
import re
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from mlm_jax import data, hf_inputs, predict, rundir, train
from mlm_jax.data import domains, events
from tests.conftest import need
from tests.test_workloads import load_config
from tools import export_hf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Names that are not in the shipped training list, with a [MASK] left of the suffix: upper case,
# a subdomain, a two-label suffix, a suffix outside the TLD vocabulary ('museum': 'other').
UNSEEN = ['zorb[MASK]ank.com', 'WWW.Exa[MASK]ple.CO.UK', 'my-[MASK]ookshop.museum',
          'shop.qu[MASK]ntix.org', 'a[MASK].de']


def _load_module(path, name):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def domain_run(tmp_path_factory):
  c = load_config('domainbert', 'tiny')
  c.model.update(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, max_len=32,
                 dtype='float32')
  c.data.update(eval_fraction=0.05, license='MPL-2.0',
                cache_dir=str(tmp_path_factory.mktemp('cache')))
  # A high learning rate: after a few steps the predictions are far from uniform, so the top 5
  # has no near-ties that float noise could reorder.
  c.optimizer.update(learning_rate=1e-2, warmup_steps=2)
  c.train.update(steps=12, batch_size=8, log_every=4, eval_every=12, eval_steps=2,
                 progress_bar=False, compilation_cache_dir='')
  c.checkpoint.update(every=12)
  workdir = str(tmp_path_factory.mktemp('domain_run'))
  train.train_and_evaluate(c, workdir)
  return workdir


@pytest.fixture(scope='module')
def domain_export(domain_run, tmp_path_factory):
  need('safetensors')
  out = str(tmp_path_factory.mktemp('domain_hf'))
  assert export_hf.main([domain_run, out]) == 0  # safetensors: the default
  return out


@pytest.fixture(scope='module')
def event_run(tmp_path_factory):
  c = load_config('event_bert')
  c.model.update(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64, max_len=64,
                 dtype='float32')
  c.data.update(packing=False, chunk_records=64, cache_dir=str(tmp_path_factory.mktemp('cache')))
  c.optimizer.update(learning_rate=1e-2, warmup_steps=2)
  c.train.update(steps=6, batch_size=8, log_every=3, eval_every=6, eval_steps=1,
                 progress_bar=False, compilation_cache_dir='')
  c.checkpoint.update(every=6)
  workdir = str(tmp_path_factory.mktemp('event_run'))
  train.train_and_evaluate(c, workdir)
  return workdir


def _hf_logits(model_dir, batch):
  torch = need('torch')
  transformers = need('transformers')
  model, info = transformers.AutoModelForMaskedLM.from_pretrained(model_dir, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys']
  with torch.no_grad():
    return model.eval()(**{k: torch.tensor(np.asarray(v, np.int64)) for k, v in batch.items()}
                        ).logits.numpy()


def _ours_everywhere(predictor, batch):
  """Our logits at every position of `batch` (every position a prediction slot)."""
  b, l = batch['input_ids'].shape
  return predictor.logits({**batch, 'mlm_positions': np.tile(np.arange(l, dtype=np.int32), (b, 1))})


# --- folding, by hand -----------------------------------------------------------------------------

def test_fold_numbers_combinations_in_mixed_radix():
  spec = {'fold': {'token_types': 2, 'features': [['a', 3], ['b', 2]]}}
  # (type 1, a 2, b 1) -> (1 * 3 + 2) * 2 + 1 = 11; (0, 0, 0) -> 0; (1, 0, 1) -> 7.
  assert hf_inputs.fold(spec, [1, 0, 1], {'a': [2, 0, 0], 'b': [1, 0, 1]}).tolist() == [11, 0, 7]
  types, feats = hf_inputs.unfold(spec, np.array([11, 0, 7]))
  assert types.tolist() == [1, 0, 1] and feats['a'].tolist() == [2, 0, 0]
  assert feats['b'].tolist() == [1, 0, 1]
  with pytest.raises(ValueError, match="'a'"):
    hf_inputs.fold(spec, [0], {'a': [3], 'b': [0]})
  rng = np.random.default_rng(0)
  emb = {'token_type': {'embedding': rng.standard_normal((2, 4))},
         'extra': {'a': {'embedding': rng.standard_normal((3, 4))},
                   'b': {'embedding': rng.standard_normal((2, 4))}}}
  table = export_hf.folded_token_types(emb, spec['fold'])
  assert table.shape == (12, 4)
  for t in range(2):
    for a in range(3):
      for b in range(2):
        want = emb['token_type']['embedding'][t] + emb['extra']['a']['embedding'][a] + emb[
            'extra']['b']['embedding'][b]
        np.testing.assert_allclose(table[(t * 3 + a) * 2 + b], want, atol=1e-6)
  # A tokenizer that never sets token types folds type 0 alone: DomainBERT's token type = TLD id.
  config = {'model': {'type_vocab_size': 2, 'extra_embeddings': {'tld': 512}}}
  fold = export_hf.token_type_fold(config, data.CharTokenizer('ab'))
  assert fold == {'token_types': 1, 'features': [['tld', 512]]} and export_hf.type_rows(fold) == 512


# --- DomainBERT in transformers -------------------------------------------------------------------

def test_domain_names_split_as_training_splits_them(domain_run, domain_export, tmp_path):
  """mlm_inputs (a copy of mlm_jax.hf_inputs, no mlm_jax import) reads a name as the training
  source does: the same text and the same TLD id, for tricky spellings too."""
  mlm_inputs = _load_module(os.path.join(domain_export, 'mlm_inputs.py'), 'mlm_inputs_domain')
  spec = mlm_inputs.load_spec(domain_export)
  names = ['WWW.Example.CO.UK.', 'https://shop.example.com/a?b', 'bücher.de', 'xn--bcher-kva.de',
           'foo.bar.museum', 'a-b.github.io', 'deep.sub.domain.example.jp', '  spaced.com  ',
           'quantix.org', 'x1.com.au']
  path = tmp_path / 'names.txt'
  path.write_text('\n'.join(names + ['localhost', 'co.uk']) + '\n')
  tok = rundir.load(domain_run).tokenizer
  source = domains.DomainSource([str(path)], str(tmp_path / 'cache'), 'registrable', '')
  records = source.with_tokenizer(tok).read(np.arange(len(names) + 2), {})
  assert len(records.bad) == 2 and len(records.texts) == len(names)
  got = [mlm_inputs.domain_text(spec, n) for n in names]
  assert [t for t, _ in got] == records.texts
  assert [t for _, t in got] == records.features['tld']
  assert {t for _, t in got} > {domains.OTHER_TLD}  # some suffixes in the vocabulary, 'museum' not
  for n in names:  # the whole host, for domain_part='host'
    left, suffix = domains.split_name(n)
    assert mlm_inputs.split_domain(n, 'host') == (domains.record_text(left, 'host'), suffix)
  for bad in ('localhost', 'co.uk', 'sh[MASK]p.example.org'):  # the mask is not in the label
    with pytest.raises(ValueError):
      mlm_inputs.domain_text(spec, bad)
  imported = {a.name.split('.')[0] for node in ast.walk(ast.parse(open(
      os.path.join(domain_export, 'mlm_inputs.py')).read()))
      if isinstance(node, (ast.Import, ast.ImportFrom)) for a in getattr(node, 'names', [])}
  imported |= {node.module.split('.')[0] for node in ast.walk(ast.parse(open(
      os.path.join(domain_export, 'mlm_inputs.py')).read()))
      if isinstance(node, ast.ImportFrom) and node.module}
  assert 'mlm_jax' not in imported and 'flax' not in imported and 'jax' not in imported


def test_domainbert_in_transformers_gives_our_logits(domain_run, domain_export):
  need('torch')
  transformers = need('transformers')
  sys.path.insert(0, domain_export)
  try:
    import mlm_inputs  # pylint: disable=import-outside-toplevel,import-error
  finally:
    sys.path.remove(domain_export)
  predictor = predict.Predictor(domain_run)
  ours_batch, slots = predictor.batch(UNSEEN)
  batch = mlm_inputs.model_inputs(UNSEEN, domain_export)
  # The same characters, and token_type_ids = the TLD id training computes, on every real token.
  np.testing.assert_array_equal(batch['input_ids'], ours_batch['input_ids'])
  np.testing.assert_array_equal(batch['token_type_ids'], ours_batch['tld'])
  np.testing.assert_array_equal(batch['attention_mask'], ours_batch['segment_ids'])
  assert len(set(batch['token_type_ids'][:, 0].tolist())) >= 4
  real_BL = batch['attention_mask'] > 0
  theirs_BLV = _hf_logits(domain_export, batch)
  ours_BLV = _ours_everywhere(predictor, ours_batch)
  assert np.abs(theirs_BLV - ours_BLV)[real_BL].max() < 1e-4
  # The tokenizer: AutoTokenizer gives our ids for the label text.
  hf_tok = transformers.AutoTokenizer.from_pretrained(domain_export)
  for r, name in enumerate(UNSEEN):
    text, _ = mlm_inputs.domain_text(mlm_inputs.load_spec(domain_export), name)
    assert hf_tok(text)['input_ids'] == batch['input_ids'][r][real_BL[r]].tolist()
  assert hf_tok('ab_Z')['input_ids'] == [2, 5, 6, 1, 30, 3]  # '_' unknown, 'Z' lowercased
  # The fill-mask pipeline (token_type_ids set by mlm_inputs) returns our top 5, in order.
  fill = mlm_inputs.fill_mask(domain_export)
  plain = transformers.pipeline('fill-mask', model=domain_export)
  for r, name in enumerate(UNSEEN):
    ours = predictor.predict([name], top_k=6)[0][0]
    probs = [p for _, p in ours]
    # Logits agree within 1e-4 (above), so logit gaps above 2e-4 cannot swap.
    assert min(np.diff(-np.log(probs))) > 2e-4
    theirs = fill(name)
    assert [x['token_str'] for x in theirs] == [t for t, _ in ours[:5]]
    np.testing.assert_allclose([x['score'] for x in theirs], probs[:5], atol=1e-5)
    label, tld = mlm_inputs.domain_text(mlm_inputs.load_spec(domain_export), name)
    assert tld != 0
    # Without token_type_ids the model sees TLD 0 (padding): other probabilities.
    assert np.abs(np.array([x['score'] for x in plain(label)]) - probs[:5]).max() > 1e-4


def test_model_card_and_config(domain_run, domain_export):
  need('torch')  # the card's example runs
  need('transformers')
  card = open(os.path.join(domain_export, 'README.md')).read()
  config = rundir.find_config(rundir.resolve(domain_run), 12)
  assert json.load(open(os.path.join(domain_export, 'mlm_jax_config.json'))) == config
  meta = rundir.read_params(rundir.resolve(domain_run), 12)[1]
  assert f"{meta['param_counts']['total']:,} parameters" in card
  assert '| 2 | 32 | 2 | 64 | 32 | 43 | 2 |' in card  # layers hidden heads ff max_len vocab types
  assert '`{assets}/domains/psl_private_domains.txt`' in card and 'license: MPL-2.0' in card
  assert 'steps: 12 (of train.steps = 12)' in card
  assert f'{12 * 8 * 32:,} token positions' in card  # steps x batch x max_len
  last_eval = {k: v[1][-1] for k, v in rundir.read_metrics(domain_run).items()
               if k.startswith('eval/')}
  assert 'at step 12' in card and f"| eval/loss | {last_eval['eval/loss']:.6g} |" in card
  assert f"| eval/accuracy | {last_eval['eval/accuracy']:.6g} |" in card
  assert 'One token per character of `abcdefghijklmnopqrstuvwxyz0123456789-.`' in card
  tlds = len(rundir.load(domain_run).tokenizer.tlds)
  assert f'({tlds} suffixes in mlm_inputs.json' in card and '512 rows' in card
  # The card's code runs as written.
  code = re.search(r'```python\n(.*?)```', card, re.S).group(1).replace('EXPORT_DIR', domain_export)
  namespace = {}
  exec(compile(code, 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  assert tuple(namespace['logits'].shape) == (1, len('example') + 2, 43)


# --- the event-session BERT in transformers -------------------------------------------------------

def test_event_bert_in_transformers_gives_our_logits(event_run, tmp_path):
  need('safetensors')
  torch = need('torch')
  transformers = need('transformers')
  out = str(tmp_path / 'hf')
  result = export_hf.export(event_run, out)
  assert result['warnings'] == []
  mlm_inputs = _load_module(os.path.join(out, 'mlm_inputs.py'), 'mlm_inputs_events')
  spec = mlm_inputs.load_spec(out)
  run = rundir.load(event_run)
  tok, config = run.tokenizer, run.config
  assert json.load(open(os.path.join(out, 'config.json')))['type_vocab_size'] == 2 * 5
  predictor = predict.Predictor(event_run)
  # Training's own batches (unpacked rows): ours against transformers with the folded types.
  batch = next(iter(data.eval_batches(ml_collections.ConfigDict(config), tok, max_batches=1)))
  hf_batch = {'input_ids': batch['input_ids'], 'attention_mask': (batch['segment_ids'] > 0) * 1,
              'token_type_ids': mlm_inputs.fold(spec, batch['token_type_ids'],
                                                {'event_type': batch['event_type']})}
  real_BL = batch['segment_ids'] > 0
  diff = np.abs(_hf_logits(out, hf_batch) - _ours_everywhere(predictor, batch))[real_BL]
  assert diff.max() < 1e-4
  # mlm_inputs builds those very inputs from the session text: every unmasked row that holds a
  # whole session is found among the texts of the eval sessions, with the same token types.
  sessions = events.read_sessions(data.config.expand_path(config['data']['eval_files']))
  by_ids = {}
  for s in sessions:
    try:
      x = mlm_inputs.model_inputs([mlm_inputs.session_text(s['events'], spec)], out, spec=spec)
    except ValueError:  # longer than max_len: training cuts it into windows
      continue
    by_ids[tuple(x['input_ids'][0].tolist())] = x['token_type_ids'][0]
  found = 0
  for r in range(len(batch['input_ids'])):
    ids = batch['input_ids'][r].copy()
    w = batch['mlm_weights'][r] > 0
    ids[batch['mlm_positions'][r][w]] = batch['mlm_targets'][r][w]
    key = tuple(ids[real_BL[r]].tolist())
    if key in by_ids:
      found += 1
      np.testing.assert_array_equal(by_ids[key], hf_batch['token_type_ids'][r][real_BL[r]])
  assert found >= 3, found
  # Fill-mask through the pipeline: one text word of a session masked.
  s = next(s for s in sessions if len(mlm_inputs.session_text(s['events'], spec).split()) < 30)
  ids, feats = tok.encode_sessions([s['events']])
  ids, feats = ids[0], feats[0]
  j = int(np.flatnonzero(ids >= tok.text_offset)[1])  # a text piece
  word = tok.decode([ids[j]])
  text = mlm_inputs.session_text(s['events'], spec)
  assert f' {word} ' in f' {text.lower()} ' and not word.startswith('##')
  words = text.split(' ')
  k = [i for i, w in enumerate(words) if w.lower() == word][0]
  masked_text = ' '.join(words[:k] + ['[MASK]'] + words[k + 1:])
  n = len(ids) + 2
  ours_batch = {'input_ids': np.concatenate([[tok.cls_id], ids, [tok.sep_id]])[None].astype(np.int32),
                'segment_ids': np.ones((1, n), np.int32),
                'positions': np.arange(n, dtype=np.int32)[None],
                'token_type_ids': np.concatenate([[0], tok.token_type_V[ids], [0]])[None].astype(np.int32),
                'event_type': np.concatenate([[0], feats, [0]])[None].astype(np.int32),
                'mlm_positions': np.array([[j + 1]], np.int32)}
  ours_batch['input_ids'][0, j + 1] = tok.mask_id
  built = mlm_inputs.model_inputs([masked_text], out, spec=spec)
  np.testing.assert_array_equal(built['input_ids'], ours_batch['input_ids'])
  np.testing.assert_array_equal(built['token_type_ids'], mlm_inputs.fold(
      spec, ours_batch['token_type_ids'], {'event_type': ours_batch['event_type']}))
  logits = predictor.logits(ours_batch)[0, 0]
  probs = torch.softmax(torch.tensor(logits), -1).numpy()
  top = np.argsort(-probs, kind='stable')[:6]
  assert min(np.diff(-logits[top])) > 2e-4  # logits agree within 1e-4: no swap possible
  theirs = mlm_inputs.fill_mask(out)(masked_text)
  assert [x['token'] for x in theirs] == top[:5].tolist()
  np.testing.assert_allclose([x['score'] for x in theirs], probs[top[:5]], atol=1e-5)
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert hf_tok(masked_text)['input_ids'] == built['input_ids'][0].tolist()


# --- StableHLO ------------------------------------------------------------------------------------

_FRESH = r'''
import json, sys
import numpy as np
import jax
exported = jax.export.deserialize(bytearray(open(sys.argv[1] + '/model.jax_export', 'rb').read()))
params = dict(np.load(sys.argv[1] + '/params.npz'))
with np.load(sys.argv[2]) as z:
  inputs = {k: z[k].astype(np.int32) for k in ('input_ids', 'attention_mask', 'token_type_ids')}
np.save(sys.argv[3] + '/all.npy', np.asarray(exported.call(params, inputs)))
n = int(inputs['attention_mask'][-1].sum())  # the last row alone, unpadded: other b and l
one = {k: v[-1:, :n] for k, v in inputs.items()}
np.save(sys.argv[3] + '/one.npy', np.asarray(exported.call(params, one)))
loaded = sorted({m.split('.')[0] for m in sys.modules} & {'mlm_jax', 'flax', 'torch', 'transformers', 'tokenizers', 'optax', 'orbax'})
sys.path.insert(0, sys.argv[1])
import stablehlo_run
top = stablehlo_run.fill_masks(sys.argv[1], json.loads(sys.argv[4]))
print(json.dumps({'loaded': loaded, 'top': top}))
'''


def test_stablehlo_artifact_runs_in_a_fresh_process(domain_run, tmp_path):
  need('flatbuffers')  # jax.export's serialization
  step_dir = os.path.join(domain_run, 'checkpoints', '12')
  out = str(tmp_path / 'shlo')
  assert export_hf.main(['--checkpoint', step_dir, out, '--format=stablehlo']) == 0
  files = set(os.listdir(out))
  assert {'model.jax_export', 'params.npz', 'stablehlo_run.py', 'tokenizer.json', 'README.md',
          'mlm_inputs.py', 'mlm_inputs.json', 'mlm_jax_config.json'} <= files
  assert 'model.safetensors' not in files
  card = open(os.path.join(out, 'README.md')).read()
  assert 'jax.export.deserialize' in card and 'cpu, cuda, tpu' in card
  mlm_inputs = _load_module(os.path.join(out, 'mlm_inputs.py'), 'mlm_inputs_shlo')
  batch = mlm_inputs.model_inputs(UNSEEN, out)
  np.savez(tmp_path / 'inputs.npz', **batch)
  run = rundir.load(domain_run)
  forward = export_hf.serving_forward(run.config, export_hf.token_type_fold(run.config, run.tokenizer))
  ints = {k: v.astype(np.int32) for k, v in batch.items()}
  reference = np.asarray(forward(export_hf._flatten(run.params), ints))  # pylint: disable=protected-access
  predictor = predict.Predictor(domain_run)
  ours_batch, _ = predictor.batch(UNSEEN)
  real_BL = batch['attention_mask'] > 0
  assert np.abs(reference - _ours_everywhere(predictor, ours_batch))[real_BL].max() < 1e-5

  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='', PYTHONPATH='')
  proc = subprocess.run([sys.executable, '-c', _FRESH, out, str(tmp_path / 'inputs.npz'),
                         str(tmp_path), json.dumps(UNSEEN)], cwd=str(tmp_path), env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['loaded'] == []  # the logits came from jax and numpy alone
  np.testing.assert_array_equal(np.load(tmp_path / 'all.npy'), reference)  # identical, bit for bit
  one, n = np.load(tmp_path / 'one.npy'), int(real_BL[-1].sum())
  assert one.shape == (1, n, 43) and n < real_BL.shape[1]
  np.testing.assert_allclose(one, reference[-1:, :n], atol=1e-5)  # padding changes nothing
  ours = predictor.predict(UNSEEN, top_k=5)
  assert [[t for t, _ in row[0]] for row in result['top']] == [[t for t, _ in r[0]] for r in ours]


def test_stablehlo_exports_a_pre_ln_model(tmp_path):
  """Pre-LN has no BertForMaskedLM form, but the StableHLO artifact runs our own forward pass."""
  need('flatbuffers')
  from tests.test_ecosystem import init_run  # pylint: disable=import-outside-toplevel
  workdir = init_run(str(tmp_path / 'run'), layer_norm='pre', extra={'tld': 7})
  with pytest.raises(export_hf.ExportError, match='stablehlo'):
    export_hf.export(workdir, str(tmp_path / 'hf'))
  out = str(tmp_path / 'shlo')
  export_hf.export(workdir, out, fmt='stablehlo', platforms=('cpu',))
  import jax  # pylint: disable=import-outside-toplevel
  exported = jax.export.deserialize(bytearray(open(os.path.join(out, 'model.jax_export'), 'rb').read()))
  params = dict(np.load(os.path.join(out, 'params.npz')))
  predictor = predict.Predictor(workdir)
  ours_batch, _ = predictor.batch(['a b[MASK] c', 'ab[MASK]'], {'tld': 5})
  spec = json.load(open(os.path.join(out, 'mlm_inputs.json')))
  inputs = {'input_ids': ours_batch['input_ids'], 'attention_mask': ours_batch['segment_ids'],
            'token_type_ids': hf_inputs.fold(spec, ours_batch['token_type_ids'],
                                             {'tld': ours_batch['tld']}).astype(np.int32)}
  assert set(inputs['token_type_ids'][ours_batch['segment_ids'] > 0].tolist()) == {5}
  theirs = np.asarray(exported.call(params, inputs))
  real_BL = ours_batch['segment_ids'] > 0
  assert np.abs(theirs - _ours_everywhere(predictor, ours_batch))[real_BL].max() < 1e-5
