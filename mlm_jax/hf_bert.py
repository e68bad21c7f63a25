"""Hugging Face BERT directories read as ours: config, weights (safetensors or pytorch_model.bin)
and WordPiece vocabulary, mapped onto our parameter tree.

Shared by `tools/import_hf.py` (a new run directory from an HF model) and `train.init_from` (a new
run's parameters from an HF model). Paths may be local or gs:// (etils.epath).
"""
import io
import json

import numpy as np
from etils import epath

# HF BertConfig field -> our model.* field; all must be present (BertConfig writes them all).
SHAPE_FIELDS = {'vocab_size': 'vocab_size', 'hidden_size': 'hidden_size',
                'num_hidden_layers': 'num_layers', 'num_attention_heads': 'num_heads',
                'intermediate_size': 'intermediate_size', 'type_vocab_size': 'type_vocab_size'}


class HfImportError(ValueError):
  """The HF directory cannot be read as our BERT; the message says why."""


def read_hf_config(hf_dir: str) -> tuple[dict, list[str]]:
  """(HF config.json, warnings); raises HfImportError for what our Bert cannot express."""
  hf = read_json(epath.Path(hf_dir) / 'config.json')
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
        hf / f for f in sorted(set(read_json(index)['weight_map'].values()))]
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


class _Taker:
  """Reads checkpoint tensors by key, remembering which were read (the rest are 'unused')."""

  def __init__(self, weights: dict[str, np.ndarray], model: str):
    self.weights, self.model, self.used = weights, model, set()

  def __call__(self, key):
    if key not in self.weights:
      raise HfImportError(f'the checkpoint lacks {key!r}' + (f' (a {self.model} has it)'
                                                              if self.model else ''))
    self.used.add(key)
    return self.weights[key]


def weight_taker(weights: dict[str, np.ndarray], model: str = ''):
  """(take, used): take(key) returns a tensor or raises HfImportError naming the key (and the
  model class that has it); `used` is the set of keys taken so far."""
  taker = _Taker(weights, model)
  return taker, taker.used


def our_params(weights: dict[str, np.ndarray], hf: dict,
               max_len: int | None = None) -> tuple[dict, list[str]]:
  """HF tensors -> our params (nested dict, stacked blocks, fused QKV); also the keys left unused.
  `max_len`: keep the first max_len positions (None: all of them)."""
  take, used = weight_taker(weights)

  def linear(prefix):  # torch [out, in] -> nnx kernel [in, out]
    return {'kernel': take(prefix + '.weight').T, 'bias': take(prefix + '.bias')}

  def layer_norm(prefix):
    return {'scale': take(prefix + '.weight'), 'bias': take(prefix + '.bias')}

  position = take('embeddings.position_embeddings.weight')
  max_len = position.shape[0] if max_len is None else max_len
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
  tc = read_json(tc_path) if tc_path.exists() else {}
  lowercase = tc.get('do_lower_case', True)
  vocab_path = hf / 'vocab.txt'
  if vocab_path.exists():
    text = io.StringIO(vocab_path.read_bytes().decode('utf-8'), newline=None)
    return [line.rstrip('\r\n') for line in text if line.rstrip('\r\n')], lowercase
  tj_path = hf / 'tokenizer.json'
  if tj_path.exists():
    tj = read_json(tj_path)
    if tj.get('model', {}).get('type') == 'WordPiece':
      vocab = tj['model']['vocab']
      pieces = [None] * (max(vocab.values()) + 1)
      for piece, i in vocab.items():
        pieces[i] = piece
      if 'do_lower_case' not in tc:
        lowercase = bool((tj.get('normalizer') or {}).get('lowercase', True))
      return [p if p is not None else f'[unused_id_{i}]' for i, p in enumerate(pieces)], lowercase
  raise HfImportError(f'{hf_dir} has no vocab.txt or WordPiece tokenizer.json')


def read_json(path: epath.Path):
  return json.loads(path.read_bytes().decode('utf-8'))


def is_hf_dir(path) -> bool:
  """A directory holding an HF model: config.json plus weights (our run directories have
  checkpoints/ instead of weights)."""
  p = epath.Path(path)
  return (p / 'config.json').exists() and any(
      (p / name).exists() for name in ('model.safetensors', 'model.safetensors.index.json',
                                       'pytorch_model.bin'))
