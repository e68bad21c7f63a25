"""Exports a checkpoint as a Hugging Face BertForMaskedLM directory (PyTorch/safetensors).

  python tools/export_hf.py RUN_DIR OUT_DIR [--step N] [--drop_extra_embeddings]
  python tools/export_hf.py --checkpoint RUN_DIR/checkpoints/STEP OUT_DIR

A checkpoint step directory is enough on its own (it holds its config and tokenizer), wherever it
was copied to.

RUN_DIR and OUT_DIR may be local or gs://. Writes OUT_DIR/config.json and
OUT_DIR/model.safetensors (float32), plus vocab.txt, tokenizer_config.json and
special_tokens_map.json for a WordPiece run, so that
`transformers.BertForMaskedLM.from_pretrained(OUT_DIR)` and `AutoTokenizer.from_pretrained(OUT_DIR)`
load it. The step defaults to the best checkpoint, else the newest (as mlm_jax.predict does).

Only the original post-LN BERT has a slot for every weight; pre-LN runs are refused. Extra
categorical embeddings (model.extra_embeddings) have no slot either: they are refused unless
--drop_extra_embeddings, and the exported model's outputs then differ from ours.
Needs `safetensors` (pip install 'mlm_jax[hf]'); not torch.
"""
import argparse
import json
import os
import sys

if __name__ == '__main__':  # a program, not an import: never grab an accelerator
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # before jax is imported

import numpy as np  # noqa: E402
from etils import epath  # noqa: E402


class ExportError(ValueError):
  """The run cannot be expressed as a BertForMaskedLM; the message says why."""


def _layer_norm(p):
  return {'weight': p['scale'], 'bias': p['bias']}


def _linear(p):
  """nnx.Linear kernel [in, out] -> torch.nn.Linear weight [out, in]."""
  return {'weight': p['kernel'].T, 'bias': p['bias']}


def hf_config(config: dict, pad_id: int = 0) -> dict:
  """config.json of a BertForMaskedLM equivalent to our resolved run config."""
  m = config['model']
  return {
      'architectures': ['BertForMaskedLM'],
      'model_type': 'bert',
      'vocab_size': m['vocab_size'],
      'hidden_size': m['hidden_size'],
      'num_hidden_layers': m['num_layers'],
      'num_attention_heads': m['num_heads'],
      'intermediate_size': m['intermediate_size'],
      'max_position_embeddings': m['max_len'],
      'type_vocab_size': m['type_vocab_size'],
      'hidden_act': 'gelu',  # exact erf GELU, like jax.nn.gelu(approximate=False)
      'hidden_dropout_prob': m['dropout'],
      'attention_probs_dropout_prob': m['attention_dropout'],
      'layer_norm_eps': m['layer_norm_eps'],
      'initializer_range': m['init_std'],
      'position_embedding_type': 'absolute',
      'pad_token_id': pad_id,
      'tie_word_embeddings': True,
      'dtype': 'float32',
  }


def check_exportable(config: dict, drop_extra_embeddings: bool = False) -> list[str]:
  """Raises ExportError for what BertForMaskedLM cannot express; returns warnings."""
  m = config['model']
  if m['layer_norm'] != 'post':
    raise ExportError(
        f"model.layer_norm={m['layer_norm']!r}: BertForMaskedLM is post-LN (LayerNorm after each "
        'residual add, no final LayerNorm), so a pre-LN model has no exact equivalent there. '
        'Export works for layer_norm=post runs only.')
  extra = dict(m.get('extra_embeddings') or {})
  if extra and not drop_extra_embeddings:
    raise ExportError(
        f'model.extra_embeddings {sorted(extra)}: BERT has no input for extra categorical '
        'features. Pass --drop_extra_embeddings to export without them (the exported model then '
        'sees only the tokens, so its outputs differ from this run\'s).')
  if extra:
    return [f'dropping extra embeddings {sorted(extra)}: the exported model\'s outputs will differ '
            'from this run\'s (it never sees those features).']
  return []


def hf_state_dict(params: dict, config: dict) -> dict[str, np.ndarray]:
  """Our params (nested dict of arrays, no nnx 'value' level) -> BertForMaskedLM tensors."""
  m = config['model']
  h, n_layers = m['hidden_size'], m['num_layers']
  e, b, head = params['embeddings'], params['blocks'], params['head']
  out = {
      'bert.embeddings.word_embeddings.weight': e['word']['embedding'],
      'bert.embeddings.position_embeddings.weight': e['position']['embedding'],
      'bert.embeddings.token_type_embeddings.weight': e['token_type']['embedding'],
  }
  for k, v in _layer_norm(e['norm']).items():
    out[f'bert.embeddings.LayerNorm.{k}'] = v
  for i in range(n_layers):
    layer = lambda p, i=i: {k: v[i] for k, v in p.items()}  # one layer of the stacked blocks
    prefix = f'bert.encoder.layer.{i}.'
    qkv = layer(b['qkv'])  # columns [q | k | v], each H wide with heads inside (3, N, D)
    for j, name in enumerate(('query', 'key', 'value')):
      part = {'kernel': qkv['kernel'][:, j * h:(j + 1) * h], 'bias': qkv['bias'][j * h:(j + 1) * h]}
      for k, v in _linear(part).items():
        out[f'{prefix}attention.self.{name}.{k}'] = v
    for ours, theirs, convert in (('attn_out', 'attention.output.dense', _linear),
                                  ('attn_norm', 'attention.output.LayerNorm', _layer_norm),
                                  ('ff_in', 'intermediate.dense', _linear),
                                  ('ff_out', 'output.dense', _linear),
                                  ('ff_norm', 'output.LayerNorm', _layer_norm)):
      for k, v in convert(layer(b[ours])).items():
        out[f'{prefix}{theirs}.{k}'] = v
  for k, v in _linear(head['dense']).items():
    out[f'cls.predictions.transform.dense.{k}'] = v
  for k, v in _layer_norm(head['norm']).items():
    out[f'cls.predictions.transform.LayerNorm.{k}'] = v
  # The decoder weight is the word embedding and its bias is cls.predictions.bias (tied): like
  # save_pretrained, the file holds neither copy and from_pretrained ties them.
  out['cls.predictions.bias'] = head['bias']
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def write_tokenizer(tokenizer, out_dir: str, max_len: int) -> bool:
  """BertTokenizer files for a WordPiece tokenizer; False (nothing written) for others."""
  if tokenizer.kind != 'wordpiece':
    return False
  out = epath.Path(out_dir)
  (out / 'vocab.txt').write_bytes(('\n'.join(tokenizer.pieces) + '\n').encode('utf-8'))
  p = tokenizer.pieces
  special = {'unk_token': p[tokenizer.unk_id], 'sep_token': p[tokenizer.sep_id],
             'pad_token': p[tokenizer.pad_id], 'cls_token': p[tokenizer.cls_id],
             'mask_token': p[tokenizer.mask_id]}
  # Our normalizer: BertNormalizer(clean_text, chinese chars, strip_accents=None -> follows lowercase).
  tokenizer_config = {'tokenizer_class': 'BertTokenizer', 'do_lower_case': tokenizer.lowercase,
                      'strip_accents': None, 'tokenize_chinese_chars': True, 'do_basic_tokenize': True,
                      'model_max_length': max_len, 'clean_up_tokenization_spaces': False, **special}
  for name, obj in (('tokenizer_config.json', tokenizer_config),
                    ('special_tokens_map.json', special)):
    (out / name).write_bytes(json.dumps(obj, indent=2, ensure_ascii=False).encode('utf-8'))
  return True


def export(workdir: str, out_dir: str, step: int | None = None,
           drop_extra_embeddings: bool = False) -> dict:
  """Writes the HF directory; returns {'step', 'warnings', 'tokenizer'}."""
  from safetensors.numpy import save  # pylint: disable=import-outside-toplevel

  from mlm_jax import rundir  # pylint: disable=import-outside-toplevel

  run = rundir.resolve(workdir)
  step = rundir.choose_step(run, step)
  config = rundir.find_config(run, step)
  warnings = check_exportable(config, drop_extra_embeddings)  # refuse before reading any array
  tokenizer = rundir.load_tokenizer(run, step)
  params, _ = rundir.read_params(run, step)
  tensors = hf_state_dict(params, config)
  out = epath.Path(out_dir)  # local or gs://, like the run
  out.mkdir(parents=True, exist_ok=True)
  (out / 'model.safetensors').write_bytes(save(tensors, metadata={'format': 'pt'}))
  (out / 'config.json').write_bytes(
      json.dumps(hf_config(config, tokenizer.pad_id), indent=2, sort_keys=True).encode())
  wrote_tokenizer = write_tokenizer(tokenizer, out_dir, config['model']['max_len'])
  if not wrote_tokenizer:
    warnings.append(f'the {tokenizer.kind} tokenizer has no Hugging Face equivalent: no tokenizer '
                    f'files written (ids: specials 0-4, then data.alphabet in order).')
  return {'step': step, 'warnings': warnings, 'tokenizer': wrote_tokenizer}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('workdir', nargs='?', help='run directory (config.json, tokenizer/, '
                      'checkpoints/) or one checkpoint step directory of it')
  parser.add_argument('out', help='output directory for the Hugging Face files')
  parser.add_argument('--checkpoint', default=None, help='instead of WORKDIR: a checkpoint step '
                      'directory (RUN_DIR/checkpoints/STEP, or a copy of one anywhere) or a run '
                      'directory')
  parser.add_argument('--step', type=int, default=None, help='checkpoint step (default: best, else newest)')
  parser.add_argument('--drop_extra_embeddings', action='store_true',
                      help='export a model with extra embeddings without them (outputs will differ)')
  args = parser.parse_intermixed_args(argv)  # RUN_DIR --step N OUT, as before
  if (args.workdir is None) == (args.checkpoint is None):
    parser.error('give WORKDIR OUT, or --checkpoint PATH OUT')
  args.workdir = args.workdir or args.checkpoint
  from absl import logging  # pylint: disable=import-outside-toplevel
  from mlm_jax.checkpoint import CheckpointError  # pylint: disable=import-outside-toplevel
  from mlm_jax.errors import DataError  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.ERROR)  # orbax logs every read
  try:
    result = export(args.workdir, args.out, args.step, args.drop_extra_embeddings)
  except (ExportError, CheckpointError, DataError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for w in result['warnings']:
    print(f'warning: {w}', file=sys.stderr)
  print(f'exported step {result["step"]} of {args.workdir} to {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
