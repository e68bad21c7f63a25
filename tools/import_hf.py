"""Turns a Hugging Face BERT directory into an mlm_jax run directory to continue pretraining.

  python tools/import_hf.py HF_DIR WORKDIR [--config=configs/X.py] [--config.train.steps=N ...]
      [--max_len=N] [--dropout=P] [--attention_dropout=P]
  python -m mlm_jax.main --config=WORKDIR/import_config.py --workdir=WORKDIR

HF_DIR holds config.json, model.safetensors (or pytorch_model.bin, which needs torch) and vocab.txt
(or a WordPiece tokenizer.json). The model section comes from HF_DIR; everything else (data,
optimizer, train, checkpoint) from --config (default: the base config, i.e. the shipped corpus).
WORKDIR gets config.json, tokenizer/, vocab.txt, checkpoints/0 (the weights and a fresh optimizer
state; no input position, so training reads its input from the start) and import_config.py, the
config to train with: a run may not change model/data/optimizer/steps fields of its checkpoint, so
choose them here.
`model.dtype='auto'` is resolved for the backend this runs on; import on the training machine or
set --config.model.dtype. HF_DIR and WORKDIR may be local or gs:// (the config file --config reads
must be local: copy WORKDIR/import_config.py first).
"""
import io
import json
import sys

import numpy as np
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from mlm_jax import paths

# HF BertConfig field -> ours; all must be present (BertConfig writes them all).
_SHAPE_FIELDS = {'vocab_size': 'vocab_size', 'hidden_size': 'hidden_size',
                 'num_hidden_layers': 'num_layers', 'num_attention_heads': 'num_heads',
                 'intermediate_size': 'intermediate_size', 'type_vocab_size': 'type_vocab_size'}


class HfImportError(ValueError):
  """The HF directory cannot become an mlm_jax run; the message says why."""


def read_hf_config(hf_dir: str) -> tuple[dict, list[str]]:
  """(HF config.json, warnings); raises HfImportError for what our Bert cannot express."""
  hf = _read_json(epath.Path(hf_dir) / 'config.json')
  warnings = []
  if hf.get('model_type', 'bert') != 'bert':
    raise HfImportError(f"model_type {hf.get('model_type')!r}: only BERT checkpoints map onto our "
                       'model (RoBERTa and others offset positions or differ elsewhere).')
  if hf.get('position_embedding_type', 'absolute') != 'absolute':
    raise HfImportError(f"position_embedding_type {hf['position_embedding_type']!r}: our model has "
                       'absolute position embeddings only.')
  if hf.get('is_decoder'):
    raise HfImportError('is_decoder=true: our model is a bidirectional encoder.')
  act = hf.get('hidden_act', 'gelu')
  if act in ('gelu_new', 'gelu_pytorch_tanh', 'gelu_fast'):
    warnings.append(f'hidden_act {act!r} is the tanh GELU approximation; ours is the exact erf GELU, '
                    'so outputs differ slightly (continued pretraining adapts to it).')
  elif act != 'gelu':
    raise HfImportError(f'hidden_act {act!r}: our model uses the exact GELU only.')
  return hf, warnings


def read_hf_weights(hf_dir: str) -> dict[str, np.ndarray]:
  """All tensors of HF_DIR as float32 numpy, keys without the 'bert.' prefix, LayerNorm
  gamma/beta renamed weight/bias (old checkpoints use those names)."""
  hf = epath.Path(hf_dir)
  index, single = hf / 'model.safetensors.index.json', hf / 'model.safetensors'
  tensors = {}
  if single.exists() or index.exists():
    from safetensors.numpy import load  # pylint: disable=import-outside-toplevel
    files = [single] if single.exists() else [
        hf / f for f in sorted(set(_read_json(index)['weight_map'].values()))]
    for path in files:
      tensors.update(load(path.read_bytes()))
  elif (hf / 'pytorch_model.bin').exists():
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise HfImportError(f'{hf_dir} has only pytorch_model.bin, which needs torch to read: '
                         'pip install torch, or convert it to model.safetensors.') from None
    state = torch.load(io.BytesIO((hf / 'pytorch_model.bin').read_bytes()), map_location='cpu',
                       weights_only=True)
    tensors = {k: v.float().numpy() for k, v in state.items()}
  else:
    raise HfImportError(f'{hf_dir} has no model.safetensors, model.safetensors.index.json or '
                       'pytorch_model.bin')
  out = {}
  for key, value in tensors.items():
    key = key.removeprefix('bert.').replace('LayerNorm.gamma', 'LayerNorm.weight').replace(
        'LayerNorm.beta', 'LayerNorm.bias')
    out[key] = np.asarray(value, np.float32)
  return out


def our_params(weights: dict[str, np.ndarray], hf: dict, max_len: int) -> tuple[dict, list[str]]:
  """HF tensors -> our params (nested dict, stacked blocks, fused QKV); also the keys left unused."""
  used = set()

  def take(key):
    if key not in weights:
      raise HfImportError(f'the checkpoint lacks {key!r}')
    used.add(key)
    return weights[key]

  def linear(prefix):  # torch [out, in] -> nnx kernel [in, out]
    return {'kernel': take(prefix + '.weight').T, 'bias': take(prefix + '.bias')}

  def layer_norm(prefix):
    return {'scale': take(prefix + '.weight'), 'bias': take(prefix + '.bias')}

  position = take('embeddings.position_embeddings.weight')
  if max_len > position.shape[0]:
    raise HfImportError(f'--max_len {max_len} is longer than the checkpoint\'s '
                       f'{position.shape[0]} positions')
  params = {'embeddings': {
      'word': {'embedding': take('embeddings.word_embeddings.weight')},
      'position': {'embedding': position[:max_len]},
      'token_type': {'embedding': take('embeddings.token_type_embeddings.weight')},
      'extra': {},
      'norm': layer_norm('embeddings.LayerNorm')}}
  layers = []
  for i in range(hf['num_hidden_layers']):
    p = f'encoder.layer.{i}.'
    q, k, v = (linear(f'{p}attention.self.{n}') for n in ('query', 'key', 'value'))
    layers.append({
        'qkv': {'kernel': np.concatenate([q['kernel'], k['kernel'], v['kernel']], axis=1),
                'bias': np.concatenate([q['bias'], k['bias'], v['bias']])},
        'attn_out': linear(f'{p}attention.output.dense'),
        'attn_norm': layer_norm(f'{p}attention.output.LayerNorm'),
        'ff_in': linear(f'{p}intermediate.dense'),
        'ff_out': linear(f'{p}output.dense'),
        'ff_norm': layer_norm(f'{p}output.LayerNorm')})
  params['blocks'] = {name: {leaf: np.stack([l[name][leaf] for l in layers])
                             for leaf in layers[0][name]} for name in layers[0]}
  params['head'] = {'dense': linear('cls.predictions.transform.dense'),
                    'norm': layer_norm('cls.predictions.transform.LayerNorm'),
                    'bias': take('cls.predictions.bias')}
  word = params['embeddings']['word']['embedding']
  decoder = weights.get('cls.predictions.decoder.weight')
  if decoder is not None:
    used.add('cls.predictions.decoder.weight')
    if not np.array_equal(decoder, word):
      raise HfImportError('cls.predictions.decoder.weight differs from the word embeddings: our '
                         'decoder is tied to them (tie_word_embeddings=false is not supported).')
  used.add('cls.predictions.decoder.bias')  # tied to cls.predictions.bias
  ignorable = ('embeddings.position_ids', 'pooler.', 'cls.seq_relationship.')
  unused = sorted(k for k in weights if k not in used and not k.startswith(ignorable))
  return params, unused


def read_vocab(hf_dir: str) -> tuple[list[str], bool]:
  """(WordPiece pieces in id order, lowercase) from vocab.txt or a WordPiece tokenizer.json."""
  hf = epath.Path(hf_dir)
  tc_path = hf / 'tokenizer_config.json'
  tc = _read_json(tc_path) if tc_path.exists() else {}
  lowercase = tc.get('do_lower_case', True)
  vocab_path = hf / 'vocab.txt'
  if vocab_path.exists():
    text = io.StringIO(vocab_path.read_bytes().decode('utf-8'), newline=None)
    return [line.rstrip('\r\n') for line in text if line.rstrip('\r\n')], lowercase
  tj_path = hf / 'tokenizer.json'
  if tj_path.exists():
    tj = _read_json(tj_path)
    if tj.get('model', {}).get('type') == 'WordPiece':
      vocab = tj['model']['vocab']
      pieces = [None] * (max(vocab.values()) + 1)
      for piece, i in vocab.items():
        pieces[i] = piece
      if 'do_lower_case' not in tc:
        lowercase = bool((tj.get('normalizer') or {}).get('lowercase', True))
      return [p if p is not None else f'[unused_id_{i}]' for i, p in enumerate(pieces)], lowercase
  raise HfImportError(f'{hf_dir} has no vocab.txt or WordPiece tokenizer.json')


def build_config(base, hf: dict, vocab_path: str, lowercase: bool, max_len: int,
                 dropout: float | None, attention_dropout: float | None):
  """`base` with the model section of the HF checkpoint and its WordPiece vocabulary."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict(base.to_dict())
  m = config.model
  for theirs, ours in _SHAPE_FIELDS.items():
    m[ours] = int(hf[theirs])
  m.max_len = max_len
  m.extra_embeddings = ml_collections.ConfigDict()
  m.layer_norm = 'post'
  m.layer_norm_eps = float(hf.get('layer_norm_eps', 1e-12))
  m.init_std = float(hf.get('initializer_range', 0.02))
  m.dropout = float(hf.get('hidden_dropout_prob', 0.1) if dropout is None else dropout)
  m.attention_dropout = float(hf.get('attention_probs_dropout_prob', 0.1)
                              if attention_dropout is None else attention_dropout)
  config.data.tokenizer = 'wordpiece'
  config.data.vocab_path = vocab_path
  config.data.lowercase = bool(lowercase)
  return config


def import_hf(hf_dir: str, workdir: str, base_config, max_len: int | None = None,
              dropout: float | None = None, attention_dropout: float | None = None) -> dict:
  """Writes the run directory; returns {'warnings', 'config' (resolved dict)}."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from mlm_jax import checkpoint as ckpt  # pylint: disable=import-outside-toplevel
  from mlm_jax import config as config_lib, data, optim, steps, train  # pylint: disable=import-outside-toplevel
  from mlm_jax import model as model_lib  # pylint: disable=import-outside-toplevel

  hf, warnings = read_hf_config(hf_dir)
  pieces, lowercase = read_vocab(hf_dir)
  vocab_size = int(hf['vocab_size'])
  if len(pieces) > vocab_size:
    raise HfImportError(f'the vocabulary has {len(pieces)} pieces, the model only {vocab_size} rows')
  if len(pieces) < vocab_size:  # padded embedding tables: fill the rows no piece maps to
    warnings.append(f'vocabulary padded from {len(pieces)} to the model\'s {vocab_size} rows')
    pieces = pieces + [f'[unused_row_{i}]' for i in range(len(pieces), vocab_size)]
  max_len = int(hf['max_position_embeddings']) if max_len is None else max_len
  weights = read_hf_weights(hf_dir)
  params, unused = our_params(weights, hf, max_len)
  if unused:
    warnings.append(f'ignored {len(unused)} tensors without a slot in our model: {unused[:5]}')

  workdir = epath.Path(paths.absolute(workdir))  # local or gs://
  if (workdir / 'checkpoints').is_dir() and any((workdir / 'checkpoints').iterdir()):
    raise HfImportError(f'{workdir} already has checkpoints; import into a new directory')
  workdir.mkdir(parents=True, exist_ok=True)
  vocab_path = str(workdir / 'vocab.txt')
  paths.write_atomic(vocab_path, '\n'.join(pieces) + '\n')
  config = build_config(base_config, hf, vocab_path, lowercase, max_len, dropout, attention_dropout)
  config_lib.validate(config)
  tokenizer = data.build_tokenizer(config)

  graphdef, abstract, cfg = train.build_model(config)
  nnx.replace_by_pure_dict(abstract, jax.tree.map(jax.numpy.asarray, params))
  state = steps.init_state(abstract, optim.make_optimizer(config), config.seed)
  resolved = config.to_dict()
  resolved['model']['dtype'] = cfg.dtype
  paths.write_json(workdir / 'config.json', resolved)
  tokenizer.save(workdir / 'tokenizer')
  paths.write_atomic(workdir / 'import_config.py', _CONFIG_TEMPLATE.format(
      hf_dir=paths.absolute(hf_dir), config=json.dumps(resolved, indent=2, sort_keys=True)))
  k = config.checkpoint
  checkpointer = ckpt.Checkpointer(str(workdir / 'checkpoints'), keep=k.keep,
                                   keep_best=k.keep_best, best_metric=k.best_metric,
                                   best_mode=k.best_mode, async_save=False)
  try:
    checkpointer.save(0, state, force=True, metadata={
        'config': resolved, 'step': 0, 'imported_from': paths.absolute(hf_dir),
        'param_counts': model_lib.count_params(state['params'])})
    checkpointer.wait()
  finally:
    checkpointer.close()
  return {'warnings': warnings, 'config': resolved}


_CONFIG_TEMPLATE = '''"""Written by tools/import_hf.py from {hf_dir}.

Continue pretraining with
  python -m mlm_jax.main --config=THIS_FILE --workdir=THE_RUN_DIR
Changing a model/data/optimizer/train.steps field here breaks the checkpoint's exact resume.
"""
import json

import ml_collections

_CONFIG = json.loads(r"""{config}""")


def get_config():
  return ml_collections.ConfigDict(_CONFIG)
'''


def _read_json(path: epath.Path):
  return json.loads(path.read_bytes().decode('utf-8'))


def define_flags():
  config_flags.DEFINE_config_file('config', None, 'Training config for data/optimizer/train '
                                  '(default: the base config).', lock_config=False)
  flags.DEFINE_integer('max_len', None, 'Positions to keep (default: max_position_embeddings).')
  flags.DEFINE_float('dropout', None, 'model.dropout (default: hidden_dropout_prob).')
  flags.DEFINE_float('attention_dropout', None,
                     'model.attention_dropout (default: attention_probs_dropout_prob).')


def main(argv):
  if len(argv) != 3:
    raise app.UsageError('usage: tools/import_hf.py HF_DIR WORKDIR [--config=...]')
  f = flags.FLAGS
  if not f['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  from mlm_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from mlm_jax.errors import ConfigError, DataError  # pylint: disable=import-outside-toplevel
  base = f.config if f.config is not None else config_lib.base_config()
  try:
    result = import_hf(argv[1], argv[2], base, f.max_len, f.dropout, f.attention_dropout)
  except (HfImportError, ConfigError, DataError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  for w in result['warnings']:
    print(f'warning: {w}', file=sys.stderr)
  workdir = paths.absolute(argv[2])
  print(f'imported {argv[1]} into {workdir}; continue pretraining with\n'
        f'  python -m mlm_jax.main --config={workdir}/import_config.py --workdir={workdir}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
