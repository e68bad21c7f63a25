"""transformers' ModernBertForMaskedLM and our model.arch='modernbert', both ways: config.json <->
our model fields, state dict <-> our parameter tree (modernbert.py).

Used by tools/export_hf.py (ours -> a directory AutoModelForMaskedLM loads), tools/import_hf.py and
train.init_from (an HF ModernBERT directory -> ours). Reading the files is hf_bert's (the same
safetensors / pytorch_model.bin / vocab.txt handling).

Torch Linear weights are [out, in], our kernels [in, out]; our blocks are stacked on a leading
layers axis, and layer 0 has no attention norm in either model (ours stacks num_layers - 1 rows, or
1 unused row for a 1-layer model).
"""
import numpy as np

from mlm_jax import hf_bert
from mlm_jax.hf_bert import HfImportError

MODEL_TYPE = 'modernbert'
# HF ModernBertConfig field -> our model.* field: shapes, all required.
SHAPE_FIELDS = {'vocab_size': 'vocab_size', 'hidden_size': 'hidden_size',
                'num_hidden_layers': 'num_layers', 'num_attention_heads': 'num_heads',
                'intermediate_size': 'intermediate_size'}
_FULL, _SLIDING = 'full_attention', 'sliding_attention'
# Biases our model does not have: a checkpoint with any of them cannot be expressed.
_NO_BIAS = ('norm_bias', 'attention_bias', 'mlp_bias', 'classifier_bias')
_TANH_GELUS = ('gelu_new', 'gelu_pytorch_tanh', 'gelu_fast')


def layer_types(num_layers: int, every: int) -> list[str]:
  """transformers' layer_types for 'global on every n-th layer, from layer 0'."""
  return [_FULL if i % every == 0 else _SLIDING for i in range(num_layers)]


def hf_config(model: dict, token_ids: dict) -> dict:
  """config.json of the ModernBertForMaskedLM equal to our model section (a resolved config's
  'model' dict). `token_ids`: 'pad', 'cls', 'sep' ids of our tokenizer. Writes both the
  transformers 5 fields (layer_types, rope_parameters) and the older ones they replaced
  (global_attn_every_n_layers, global_rope_theta, local_rope_theta), so either version loads it."""
  every, n = model['global_attn_every_n_layers'], model['num_layers']
  g, l = float(model['global_rope_theta']), float(model['local_rope_theta'])
  return {
      'architectures': ['ModernBertForMaskedLM'],
      'model_type': MODEL_TYPE,
      'vocab_size': model['vocab_size'],
      'hidden_size': model['hidden_size'],
      'intermediate_size': model['intermediate_size'],
      'num_hidden_layers': n,
      'num_attention_heads': model['num_heads'],
      'hidden_activation': 'gelu',  # exact erf GELU, like jax.nn.gelu(approximate=False)
      'max_position_embeddings': model['max_len'],
      'initializer_range': model['init_std'],
      'initializer_cutoff_factor': 2.0,
      'norm_eps': model['layer_norm_eps'],
      'norm_bias': False,
      'attention_bias': False,
      'mlp_bias': False,
      'attention_dropout': model['attention_dropout'],
      'embedding_dropout': model['dropout'],
      'mlp_dropout': model['dropout'],
      'local_attention': model['local_attention'],
      'global_attn_every_n_layers': every,
      'layer_types': layer_types(n, every),
      'rope_parameters': {_FULL: {'rope_type': 'default', 'rope_theta': g},
                          _SLIDING: {'rope_type': 'default', 'rope_theta': l}},
      'global_rope_theta': g,
      'local_rope_theta': l,
      'decoder_bias': True,
      'classifier_bias': False,
      'classifier_activation': 'gelu',
      'classifier_pooling': 'cls',
      'classifier_dropout': 0.0,
      'sparse_prediction': False,
      'pad_token_id': token_ids['pad'],
      'cls_token_id': token_ids['cls'],
      'sep_token_id': token_ids['sep'],
      'bos_token_id': token_ids['cls'],
      'eos_token_id': token_ids['sep'],
      'tie_word_embeddings': True,
      'dtype': 'float32',
  }


def _every_n(hf: dict, n_layers: int) -> int:
  """global_attn_every_n_layers of an HF config: from layer_types (transformers 5) if present,
  else the field itself (default 3); HfImportError if the layers follow no such pattern."""
  types = hf.get('layer_types')
  if types is None:
    return int(hf.get('global_attn_every_n_layers', 3))
  if len(types) != n_layers or set(types) - {_FULL, _SLIDING}:
    raise HfImportError(f'layer_types {types} is not one of {_FULL!r}/{_SLIDING!r} per layer')
  later = [i for i, t in enumerate(types) if t == _FULL and i > 0]
  every = later[0] if later else n_layers
  if types != layer_types(n_layers, every):
    raise HfImportError(f'layer_types {types}: our model attends globally on every n-th layer '
                        'from layer 0 (global_attn_every_n_layers) and locally on the others')
  return every


def _rope_thetas(hf: dict) -> tuple[float, float]:
  """(global, local) rotary bases, from rope_parameters (transformers 5) or the older fields."""
  if hf.get('rope_scaling'):
    raise HfImportError(f"rope_scaling {hf['rope_scaling']}: our rotary embeddings are unscaled")
  params = hf.get('rope_parameters') or {}
  thetas = []
  for kind, old_field, default in ((_FULL, 'global_rope_theta', 160000.0),
                                   (_SLIDING, 'local_rope_theta', 10000.0)):
    p = params.get(kind) or {}
    if p.get('rope_type', 'default') != 'default':
      raise HfImportError(f"rope_parameters.{kind}.rope_type {p['rope_type']!r}: our rotary "
                          "embeddings are the 'default' (unscaled) kind")
    thetas.append(float(p.get('rope_theta', hf.get(old_field, default))))
  return thetas[0], thetas[1]


def model_fields(hf: dict) -> tuple[dict, list[str]]:
  """(our model.* fields for an HF ModernBERT config.json, warnings); HfImportError for what our
  model cannot express."""
  if hf.get('model_type') != MODEL_TYPE:
    raise HfImportError(f"model_type {hf.get('model_type')!r} is not {MODEL_TYPE!r}")
  warnings = []
  for field in _NO_BIAS:
    if hf.get(field, False):
      raise HfImportError(f'{field}=true: our ModernBERT has no such bias')
  for field in ('hidden_activation', 'classifier_activation'):
    act = hf.get(field, 'gelu')
    if act in _TANH_GELUS:
      warnings.append(f'{field} {act!r} is the tanh GELU approximation; ours is the exact erf GELU, '
                      'so outputs differ slightly (continued pretraining adapts to it).')
    elif act != 'gelu':
      raise HfImportError(f'{field} {act!r}: our model uses the exact GELU only.')
  if not hf.get('tie_word_embeddings', True):
    raise HfImportError('tie_word_embeddings=false: our decoder is tied to the token embeddings.')
  if not hf.get('decoder_bias', True):
    warnings.append('decoder_bias=false: our decoder has a bias; it starts at zero.')
  fields = {ours: int(hf[theirs]) for theirs, ours in SHAPE_FIELDS.items()}
  head_dim = hf.get('head_dim')
  if head_dim and head_dim * fields['num_heads'] != fields['hidden_size']:
    raise HfImportError(f'head_dim {head_dim} x {fields["num_heads"]} heads is not hidden_size '
                        f'{fields["hidden_size"]}')
  local_attention = int(hf.get('local_attention', 128))
  if local_attention % 2:  # transformers attends local_attention // 2 each way: the same window
    local_attention -= 1
  embedding_dropout = float(hf.get('embedding_dropout', 0.0))
  mlp_dropout = float(hf.get('mlp_dropout', 0.0))
  if embedding_dropout != mlp_dropout:
    warnings.append(f'embedding_dropout {embedding_dropout} and mlp_dropout {mlp_dropout} differ: '
                    f'model.dropout is one rate for both; using {mlp_dropout}.')
  global_theta, local_theta = _rope_thetas(hf)
  fields.update(
      arch='modernbert', layer_norm='pre', max_len=int(hf.get('max_position_embeddings', 8192)),
      layer_norm_eps=float(hf.get('norm_eps', 1e-5)), init_std=float(hf.get('initializer_range', 0.02)),
      dropout=mlp_dropout, attention_dropout=float(hf.get('attention_dropout', 0.0)),
      local_attention=local_attention,
      global_attn_every_n_layers=_every_n(hf, fields['num_layers']),
      global_rope_theta=global_theta, local_rope_theta=local_theta, extra_embeddings={})
  return fields, warnings


def _t(kernel):
  """nnx kernel [in, out] <-> torch weight [out, in]."""
  return np.asarray(kernel).T


def hf_state_dict(params: dict, model: dict) -> dict[str, np.ndarray]:
  """Our params (nested dict of arrays) -> ModernBertForMaskedLM tensors, float32. The decoder
  weight is the token embedding (tied): like save_pretrained, the file holds no copy of it."""
  e, b, head = params['embeddings'], params['blocks'], params['head']
  out = {'model.embeddings.tok_embeddings.weight': e['word']['embedding'],
         'model.embeddings.norm.weight': e['norm']['scale']}
  for i in range(model['num_layers']):
    p = f'model.layers.{i}.'
    if i > 0:
      out[p + 'attn_norm.weight'] = b['attn_norm']['scale'][i - 1]
    out[p + 'attn.Wqkv.weight'] = _t(b['qkv']['kernel'][i])
    out[p + 'attn.Wo.weight'] = _t(b['attn_out']['kernel'][i])
    out[p + 'mlp_norm.weight'] = b['ff_norm']['scale'][i]
    out[p + 'mlp.Wi.weight'] = _t(b['ff_in']['kernel'][i])
    out[p + 'mlp.Wo.weight'] = _t(b['ff_out']['kernel'][i])
  out['model.final_norm.weight'] = params['final_norm']['scale']
  out['head.dense.weight'] = _t(head['dense']['kernel'])
  out['head.norm.weight'] = head['norm']['scale']
  out['decoder.bias'] = head['bias']
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def our_params(weights: dict[str, np.ndarray], hf: dict) -> tuple[dict, list[str]]:
  """HF ModernBertForMaskedLM tensors (hf_bert.read_hf_weights) -> our params; also the keys
  left unused."""
  take, used = hf_bert.weight_taker(weights, 'ModernBertForMaskedLM')

  scale = lambda key: {'scale': take(key)}
  kernel = lambda key: {'kernel': _t(take(key))}
  n_layers = int(hf['num_hidden_layers'])
  layers = []
  for i in range(n_layers):
    p = f'model.layers.{i}.'
    layers.append({'qkv': kernel(p + 'attn.Wqkv.weight'), 'attn_out': kernel(p + 'attn.Wo.weight'),
                   'ff_norm': scale(p + 'mlp_norm.weight'), 'ff_in': kernel(p + 'mlp.Wi.weight'),
                   'ff_out': kernel(p + 'mlp.Wo.weight')})
  blocks = {name: {leaf: np.stack([layer[name][leaf] for layer in layers])
                   for leaf in layers[0][name]} for name in layers[0]}
  if n_layers > 1:
    norms = np.stack([take(f'model.layers.{i}.attn_norm.weight') for i in range(1, n_layers)])
  else:  # a 1-layer model keeps layer 0's unused row (modernbert.py)
    norms = np.ones((1, int(hf['hidden_size'])), np.float32)
  blocks['attn_norm'] = {'scale': norms}
  word = take('model.embeddings.tok_embeddings.weight')
  decoder = weights.get('decoder.weight')
  if decoder is not None:
    used.add('decoder.weight')
    if not np.array_equal(decoder, word):
      raise HfImportError('decoder.weight differs from the token embeddings: our decoder is tied '
                          'to them (tie_word_embeddings=false is not supported).')
  if 'decoder.bias' in weights:
    bias = take('decoder.bias')
  else:  # decoder_bias=false (model_fields warns)
    bias = np.zeros((int(hf['vocab_size']),), np.float32)
  params = {'embeddings': {'word': {'embedding': word},
                           'norm': scale('model.embeddings.norm.weight')},
            'blocks': blocks,
            'final_norm': scale('model.final_norm.weight'),
            'head': {'dense': kernel('head.dense.weight'), 'norm': scale('head.norm.weight'),
                     'bias': bias}}
  return params, sorted(k for k in weights if k not in used)
