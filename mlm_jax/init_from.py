"""train.init_from: a new run's parameters from one of our checkpoints or a Hugging Face BERT or
ModernBERT.

Continued pretraining (BERT's phase 2 at a longer max_len, domain-adaptive pretraining from a
published BERT): the parameters come from the source, the optimizer state and the step start fresh.
The source is a run directory (its newest checkpoint), a checkpoint step directory, or an HF BERT
directory (config.json, model.safetensors or pytorch_model.bin, vocab.txt or tokenizer.json; a
ModernBertForMaskedLM starts a model.arch='modernbert' run: mlm_jax/hf_modernbert.py).

What carries over and what does not:
- architecture, vocabulary, hidden size, layers, heads, feed-forward width, LayerNorm placement:
  must match; the ConfigError names our field. The vocabulary is compared piece by piece, not only
  its size. ModernBERT's window, global-layer pattern and rotary bases may change (logged: outputs
  differ); it has no position, token-type or extra tables, so the rest of this list is BERT's.
- model.max_len larger than the source's table: the trained table linearly interpolated to the new
  length (first and last rows kept; every new position lies between two trained ones, in order), so
  the model starts with a sense of order at every position. Repeating the table (Longformer's copy
  of RoBERTa's) keeps short sequences exact but makes position p and p + L look alike; on a task
  where the answer depends on position it started no better than fresh rows, interpolation far
  better (README "Continued pretraining"). Smaller: the first max_len rows.
- model.type_vocab_size larger: the source's rows, then fresh rows as a new model would have them;
  smaller is refused (trained rows would be lost).
- model.extra_embeddings: a name the source lacks starts fresh (the model's own init); a name only
  the source has is dropped (logged); one in both must have the same size (and, for 'tld' and
  'event_type', the same vocabulary).
"""
import dataclasses
import os

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from mlm_jax import checkpoint as ckpt
from mlm_jax import hf_bert
from mlm_jax import hf_modernbert
from mlm_jax import paths
from mlm_jax import rundir
from mlm_jax.data import tokenizers
from mlm_jax.errors import ConfigError

FIELD = 'train.init_from'
# Must be equal in the source and the new run: the parameters' shapes or meaning depend on them.
_SAME = ('arch', 'vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'intermediate_size',
         'layer_norm')
# ModernBERT fields that change what the parameters compute but not their shapes: noted.
_MODERNBERT_NOTED = ('local_attention', 'global_attn_every_n_layers', 'global_rope_theta',
                     'local_rope_theta')
# The tokenizer attribute holding an extra embedding's vocabulary (its ids' meaning).
_EXTRA_VOCABS = {'tld': 'tlds', 'event_type': 'event_types'}


@dataclasses.dataclass
class Source:
  """A source read back: its model section in our field names, params in our layout."""
  name: str  # for messages: what was read
  model: dict  # vocab_size, ..., max_len, type_vocab_size, extra_embeddings, layer_norm(_eps)
  params: dict  # nested dict of numpy arrays, as rundir.read_params returns
  tokenizer: object | None  # ours, or None
  hf_vocab: tuple[list[str], bool] | None = None  # an HF directory's (pieces, lowercase)
  notes: list[str] = dataclasses.field(default_factory=list)  # warnings made while reading


def read_source(path: str) -> Source:
  """The source at `path`: one of our runs or steps, or an HF BERT directory."""
  path = paths.absolute(os.path.expanduser(path))
  p = epath.Path(path)
  if not p.exists():
    raise ConfigError(FIELD, f'{path}: not found')
  if (p / rundir.CHECKPOINTS_DIR).is_dir() or (p.is_dir() and p.name.isdigit()):
    return _read_ours(path)
  if hf_bert.is_hf_dir(p):
    return _read_hf(path)
  raise ConfigError(FIELD, f'{path}: neither a run directory (checkpoints/), a checkpoint step '
                    'directory, nor a Hugging Face BERT directory (config.json with '
                    'model.safetensors or pytorch_model.bin)')


def _read_ours(path: str) -> Source:
  run = rundir.resolve(path)
  step = run.step
  if step is None:  # a run: the end of its training (a step directory picks another)
    checkpointer = ckpt.Checkpointer(str(run.checkpoints), read_only=True)
    try:
      step = checkpointer.latest_step()
    finally:
      checkpointer.close()
    if step is None:
      raise ConfigError(FIELD, f'{path}: no checkpoint in {run.checkpoints}')
  config = rundir.find_config(run, step)
  params, _ = rundir.read_params(run, step)  # checked against the checkpoint's digest
  model = dict(config['model'])
  model['extra_embeddings'] = dict(model.get('extra_embeddings') or {})
  model.setdefault('arch', 'bert')  # written before model.arch existed
  return Source(f'{path} (step {step})', model, params, rundir.load_tokenizer(run, step))


def _read_hf(path: str) -> Source:
  hf = hf_bert.read_json(epath.Path(path) / 'config.json')
  modern = hf.get('model_type') == hf_modernbert.MODEL_TYPE
  try:
    if modern:
      model, notes = hf_modernbert.model_fields(hf)
      params, unused = hf_modernbert.our_params(hf_bert.read_hf_weights(path), hf)
    else:
      hf, notes = hf_bert.read_hf_config(path)
      params, unused = hf_bert.our_params(hf_bert.read_hf_weights(path), hf)
      model = {ours: int(hf[theirs]) for theirs, ours in hf_bert.SHAPE_FIELDS.items()}
      model.update(max_len=params['embeddings']['position']['embedding'].shape[0],
                   extra_embeddings={}, layer_norm='post',
                   layer_norm_eps=float(hf.get('layer_norm_eps', 1e-12)), arch='bert')
  except hf_bert.HfImportError as e:
    raise ConfigError(FIELD, f'{path}: {e}') from None
  if unused:
    notes.append(f'ignored {len(unused)} tensors without a slot in our model: {unused[:5]}')
  name = 'ModernBERT' if modern else 'BERT'
  return Source(f'{path} (Hugging Face {name})', model, params, None, _hf_vocab(path, notes), notes)


def _hf_vocab(path: str, notes: list[str]):
  try:
    return hf_bert.read_vocab(path)
  except hf_bert.HfImportError:
    notes.append(f'{path} has no vocab.txt or WordPiece tokenizer.json: the vocabulary cannot be '
                 'checked against the run\'s; make sure data.vocab_path is the model\'s')
    return None


# ---------------------------------------------------------------------------------------------
# Checks: refuse what cannot carry over, naming our field.


def check(source: Source, model_config, tokenizer) -> None:
  """ConfigError naming the first field of ours that the source cannot start."""
  theirs = source.model
  for name in _SAME:
    if theirs[name] != model_config[name]:
      raise ConfigError(f'model.{name}', f'{model_config[name]!r} here, but train.init_from '
                        f'{source.name} has {theirs[name]!r}; the parameters cannot carry over')
  if model_config.arch == 'modernbert':
    for name in _MODERNBERT_NOTED:
      if theirs.get(name, model_config[name]) != model_config[name]:
        source.notes.append(f'model.{name} is {model_config[name]} here, {theirs[name]} in the '
                            'source: outputs differ')
  else:
    _check_bert_tables(source, model_config, tokenizer)
  if theirs.get('layer_norm_eps', model_config.layer_norm_eps) != model_config.layer_norm_eps:
    source.notes.append(f'model.layer_norm_eps is {model_config.layer_norm_eps} here, '
                        f'{theirs["layer_norm_eps"]} in the source: outputs differ slightly')
  if tokenizer is not None:
    _check_vocabulary(source, tokenizer)


def _check_bert_tables(source: Source, model_config, tokenizer) -> None:
  """The token-type and extra embedding tables (BERT only)."""
  theirs = source.model
  if model_config.type_vocab_size < theirs['type_vocab_size']:
    raise ConfigError('model.type_vocab_size', f'{model_config.type_vocab_size} here, but '
                      f'train.init_from {source.name} has {theirs["type_vocab_size"]}: trained rows '
                      'would be dropped (a larger value adds fresh rows)')
  extra = dict(model_config.extra_embeddings)
  for name in sorted(extra.keys() & theirs['extra_embeddings'].keys()):
    if extra[name] != theirs['extra_embeddings'][name]:
      raise ConfigError(f'model.extra_embeddings.{name}', f'{extra[name]} here, but train.init_from '
                        f'{source.name} has {theirs["extra_embeddings"][name]}')
    _check_extra_vocab(source, tokenizer, name)


def _token_table(tok) -> tuple[str, list[str]]:
  """(the field that sets it, the token of each id)."""
  if hasattr(tok, 'pieces'):
    return 'data.vocab_path', list(tok.pieces)
  return 'data.alphabet', list(tokenizers.SPECIAL_TOKENS) + list(tok.alphabet)


def _check_vocabulary(source: Source, tokenizer) -> None:
  if source.tokenizer is not None:
    lowercase, (kind, pieces) = source.tokenizer.lowercase, _token_table(source.tokenizer)
  elif source.hf_vocab is not None:
    (pieces, lowercase), kind = source.hf_vocab, 'data.vocab_path'
  else:
    return
  field, ours = _token_table(tokenizer)
  if kind != field:
    raise ConfigError('data.tokenizer', f'the {tokenizer.kind} tokenizer here, but train.init_from '
                      f'{source.name} was trained with another kind of vocabulary')
  # An HF vocabulary may be shorter than its embedding table (padded rows no piece maps to).
  n = len(pieces) if source.tokenizer is None else max(len(pieces), len(ours))
  diff = next((i for i in range(n) if i >= len(ours) or i >= len(pieces) or ours[i] != pieces[i]),
              None)
  if diff is not None:
    at = lambda table: repr(table[diff]) if diff < len(table) else 'nothing'
    raise ConfigError(field, f'the vocabulary differs from train.init_from {source.name}: id {diff} '
                      f'is {at(ours)} here, {at(pieces)} there (the embeddings would mean other '
                      'tokens)')
  if lowercase != tokenizer.lowercase:
    raise ConfigError('data.lowercase', f'{tokenizer.lowercase} here, but train.init_from '
                      f'{source.name} was trained with lowercase={lowercase}')


def _check_extra_vocab(source: Source, tokenizer, name: str) -> None:
  attr = _EXTRA_VOCABS.get(name)
  theirs = getattr(source.tokenizer, attr, None) if attr else None
  ours = getattr(tokenizer, attr, None) if attr else None
  if theirs is not None and ours is not None and list(theirs) != list(ours):
    diff = next(i for i in range(max(len(theirs), len(ours)))
                if i >= len(theirs) or i >= len(ours) or theirs[i] != ours[i])
    raise ConfigError(f'model.extra_embeddings.{name}', f'its vocabulary differs from train.init_from '
                      f'{source.name} (entry {diff}: {list(ours)[diff:diff + 1]} here, '
                      f'{list(theirs)[diff:diff + 1]} there): the ids would mean other values')


# ---------------------------------------------------------------------------------------------
# Conversion: the source's arrays in the new run's shapes.


def extend_positions(table_LH: np.ndarray, max_len: int) -> np.ndarray:
  """The position table at max_len rows: longer, row i is the trained table at coordinate
  i * (L - 1) / (max_len - 1), linearly interpolated between its two neighbouring rows; shorter
  (or equal), the first max_len rows."""
  old = table_LH.shape[0]
  if max_len <= old:
    return table_LH[:max_len]
  x = np.arange(max_len) * (old - 1) / (max_len - 1)
  lo = np.floor(x).astype(np.int64)
  hi = np.minimum(lo + 1, old - 1)
  frac = (x - lo)[:, None]
  table = table_LH.astype(np.float64)
  return ((1 - frac) * table[lo] + frac * table[hi]).astype(table_LH.dtype)


def convert(source: Source, model_config) -> tuple[dict, list[str]]:
  """(the source's params reshaped for `model_config`, log lines). Leaves the new run initialises
  itself are absent; a token-type table with fewer rows fills the first rows only."""
  params = jax.tree.map(lambda x: x, source.params)  # a copy of the containers, not the arrays
  if model_config.arch == 'modernbert':  # no position, token-type or extra tables
    return params, []
  emb, lines = params['embeddings'], []
  old_len = emb['position']['embedding'].shape[0]
  if old_len != model_config.max_len:
    emb['position']['embedding'] = extend_positions(emb['position']['embedding'],
                                                    model_config.max_len)
    lines.append(f'position table: {old_len} -> {model_config.max_len} rows ('
                 + ('interpolated)' if model_config.max_len > old_len else 'the first rows)'))
  old_types = emb['token_type']['embedding'].shape[0]
  if old_types < model_config.type_vocab_size:
    lines.append(f'token types: {old_types} trained rows, '
                 f'{model_config.type_vocab_size - old_types} new')
  wanted, extra = dict(model_config.extra_embeddings), emb.get('extra') or {}
  for name in sorted(extra.keys() - wanted.keys()):
    lines.append(f'extra embedding {name!r} of the source dropped (not in model.extra_embeddings)')
  for name in sorted(wanted.keys() - extra.keys()):
    lines.append(f'extra embedding {name!r} starts fresh (the source has none)')
  emb['extra'] = {name: extra[name] for name in wanted if name in extra}
  return params, lines


def _flat(tree, prefix=()) -> dict[tuple, np.ndarray]:
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
  return out


def _key_path(path) -> tuple:
  """A params leaf's path as dict keys (nnx adds a trailing '.value' attribute)."""
  return tuple(p.key for p in path if isinstance(p, jax.tree_util.DictKey))


def place(fresh_params, shardings, converted: dict):
  """`fresh_params` (the new run's initialised params, sharded) with each leaf replaced by the
  converted array in its sharding; a leaf absent from `converted` keeps its fresh value, one with
  fewer rows replaces the first rows only."""
  flat = _flat(converted)
  used = set()

  def put(path, fresh, sharding):
    key = _key_path(path)
    host = flat.get(key)
    if host is None:
      if key[:2] != ('embeddings', 'extra'):
        raise ConfigError(FIELD, f'the source has no parameter {"/".join(key)}')
      return fresh
    used.add(key)
    host = np.asarray(host).astype(fresh.dtype)
    if host.shape[1:] != fresh.shape[1:] or host.shape[0] > fresh.shape[0]:
      raise ConfigError(FIELD, f'parameter {"/".join(key)} is {host.shape} in the source, '
                        f'{fresh.shape} here')
    if host.shape == fresh.shape:  # each device takes its own slice of the host array
      return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    rows = jax.make_array_from_callback(
        host.shape, NamedSharding(sharding.mesh, PartitionSpec()), lambda index: host[index])
    return jax.jit(lambda f, r: f.at[:r.shape[0]].set(r), out_shardings=sharding)(fresh, rows)

  placed = jax.tree_util.tree_map_with_path(put, fresh_params, shardings)
  left = sorted('/'.join(k) for k in flat.keys() - used)
  if left:
    raise ConfigError(FIELD, f'the source has parameters this model has no place for: {left[:5]}')
  return placed


def apply(path: str, config, state: dict, shardings: dict, tokenizer) -> dict:
  """`state` (a fresh one, from Trainer.init_state) with its params from `path`; the optimizer
  state stays as initialised (Adam's moments are zeros whatever the params), the step 0."""
  source = read_source(path)
  check(source, config.model, tokenizer)
  converted, lines = convert(source, config.model)
  state = dict(state)
  state['params'] = place(state['params'], shardings['params'], converted)
  logging.info('train.init_from: parameters from %s', source.name)
  for line in lines:
    logging.info('train.init_from: %s', line)
  for note in source.notes:
    logging.warning('train.init_from: %s', note)
  return state
