"""Exports a checkpoint for use outside mlm_jax: a Hugging Face BertForMaskedLM (or, for
model.arch='modernbert', ModernBertForMaskedLM) directory (safetensors, the default) or a StableHLO
serving artifact (a serialized jax.export).

  python tools/export_hf.py RUN_DIR OUT_DIR [--step N] [--format safetensors|stablehlo]
  python tools/export_hf.py --checkpoint RUN_DIR/checkpoints/STEP OUT_DIR

A checkpoint step directory is enough on its own (it holds its config and tokenizer), wherever it
was copied to. RUN_DIR and OUT_DIR may be local or gs://. The step defaults to the best checkpoint,
else the newest (as mlm_jax.predict does).

Every export directory holds README.md (a model card: architecture and size, training data and its
license, steps and tokens seen, final eval metrics, tokenizer, how to load and fill a mask),
mlm_jax_config.json (the run's resolved config), the tokenizer (WordPiece: vocab.txt and
BertTokenizer files; char, domain and session tokenizers: a `tokenizers` tokenizer.json with the same
ids that AutoTokenizer loads) and mlm_inputs.py + mlm_inputs.json (a copy of mlm_jax/hf_inputs.py
and what it needs: builds input_ids and token_type_ids for a domain name, a session or a text).

--format=safetensors: config.json + model.safetensors (float32), so that
`AutoModelForMaskedLM.from_pretrained(OUT)` and `AutoTokenizer.from_pretrained(OUT)` load it. Only
post-LN BERT has a slot for every weight: pre-LN runs are refused (export them as stablehlo);
ModernBERT runs export as ModernBertForMaskedLM (mlm_jax/hf_modernbert.py), all of them. Extra
categorical embeddings (model.extra_embeddings: DomainBERT's TLD, the session model's event type)
are folded into token_type_embeddings: embeddings are summed before the first LayerNorm, so HF token
type (a, f1, f2, ...) = type[a] + extra1[f1] + ..., numbered in mixed radix (token type most
significant, features in name order; a model whose tokenizer never sets token types folds type 0
alone, so DomainBERT's HF token type is its TLD id). --drop_extra_embeddings exports without them
(outputs then differ from ours).

--format=stablehlo: model.jax_export, the fill-mask forward pass (int32 [b, l] input_ids,
attention_mask and token_type_ids as for transformers -> float32 logits [b, l, V]; b and l symbolic,
l <= model.max_len) lowered for --platforms; params.npz, the float32 weights it takes; and
stablehlo_run.py, a loader needing only jax and numpy. Any layer_norm works here.
Needs `safetensors` for the default format (pip install 'mlm_jax[hf]'), `flatbuffers` for stablehlo;
never torch.
"""
import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys

if __name__ == '__main__':  # a program, not an import: never grab an accelerator
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # before jax is imported
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from etils import epath  # noqa: E402

from mlm_jax import hf_inputs  # noqa: E402
from mlm_jax import hf_modernbert  # noqa: E402

FORMATS = ('safetensors', 'stablehlo')
PLATFORMS = ('cpu', 'cuda', 'tpu')  # what --format=stablehlo lowers for by default
# A folded token-type table larger than this is refused: its rows are every combination of the
# extra features' ids, so two large vocabularies multiply.
MAX_TYPE_ROWS = 1 << 16
EXPORT_FILE, PARAMS_FILE, CONFIG_FILE = 'model.jax_export', 'params.npz', 'mlm_jax_config.json'
INPUTS_MODULE, RUNNER = 'mlm_inputs.py', 'stablehlo_run.py'
_HERE = os.path.dirname(os.path.abspath(__file__))


class ExportError(ValueError):
  """The run cannot be exported as asked; the message says why."""


def _layer_norm(p):
  return {'weight': p['scale'], 'bias': p['bias']}


def _linear(p):
  """nnx.Linear kernel [in, out] -> torch.nn.Linear weight [out, in]."""
  return {'weight': p['kernel'].T, 'bias': p['bias']}


def is_modernbert(config: dict) -> bool:
  return config['model'].get('arch', 'bert') == 'modernbert'


def token_type_fold(config: dict, tokenizer=None, drop_extra_embeddings: bool = False) -> dict:
  """How extra embeddings fold into token types: {'token_types': rows of our type table used,
  'features': [[name, size], ...] in name order}. Without extras nothing folds (the whole table)."""
  m = config['model']
  extra = [] if drop_extra_embeddings else sorted(dict(m.get('extra_embeddings') or {}).items())
  uses_types = tokenizer is None or getattr(tokenizer, 'token_type_V', None) is not None
  return {'token_types': m['type_vocab_size'] if uses_types or not extra else 1,
          'features': [[name, int(size)] for name, size in extra]}


def type_rows(fold: dict) -> int:
  return fold['token_types'] * math.prod(size for _, size in fold['features'])


def hf_config(config: dict, pad_id: int = 0, fold: dict | None = None) -> dict:
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
      'type_vocab_size': m['type_vocab_size'] if fold is None else type_rows(fold),
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


def check_exportable(config: dict, drop_extra_embeddings: bool = False,
                     fold: dict | None = None) -> list[str]:
  """Raises ExportError for what BertForMaskedLM cannot express; returns warnings."""
  m = config['model']
  if is_modernbert(config):  # every ModernBERT run is a ModernBertForMaskedLM
    return []
  if m['layer_norm'] != 'post':
    raise ExportError(
        f"model.layer_norm={m['layer_norm']!r}: BertForMaskedLM is post-LN (LayerNorm after each "
        'residual add, no final LayerNorm), so a pre-LN model has no exact equivalent there. '
        'Export it with --format=stablehlo, which runs our own forward pass.')
  extra = dict(m.get('extra_embeddings') or {})
  if extra and drop_extra_embeddings:
    return [f'dropping extra embeddings {sorted(extra)}: the exported model\'s outputs will differ '
            'from this run\'s (it never sees those features).']
  fold = fold or token_type_fold(config)
  if extra and type_rows(fold) > MAX_TYPE_ROWS:
    raise ExportError(
        f'model.extra_embeddings {sorted(extra)}: folded into token_type_ids they need '
        f'{type_rows(fold):,} token types (every combination of ids), more than {MAX_TYPE_ROWS:,}. '
        'Pass --drop_extra_embeddings to export without them (outputs then differ), or use '
        '--format=stablehlo.')
  return []


def folded_token_types(embeddings: dict, fold: dict) -> np.ndarray:
  """Row (a, f1, f2, ...) in mixed radix = type[a] + extra1[f1] + extra2[f2] + ...: what our
  embedding layer adds for those ids."""
  table = np.asarray(embeddings['token_type']['embedding'][:fold['token_types']], np.float32)
  h = table.shape[-1]
  for name, size in fold['features']:
    extra = np.asarray(embeddings['extra'][name]['embedding'][:size], np.float32)
    table = (table[:, None, :] + extra[None, :, :]).reshape(-1, h)
  return table


def hf_state_dict(params: dict, config: dict, fold: dict | None = None) -> dict[str, np.ndarray]:
  """Our params (nested dict of arrays, no nnx 'value' level) -> BertForMaskedLM tensors. `fold`
  (token_type_fold): extra embeddings folded into the token types; None drops them."""
  m = config['model']
  h, n_layers = m['hidden_size'], m['num_layers']
  e, b, head = params['embeddings'], params['blocks'], params['head']
  out = {
      'bert.embeddings.word_embeddings.weight': e['word']['embedding'],
      'bert.embeddings.position_embeddings.weight': e['position']['embedding'],
      'bert.embeddings.token_type_embeddings.weight': (
          e['token_type']['embedding'] if fold is None or not fold['features']
          else folded_token_types(e, fold)),
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


# --- tokenizer and inputs -------------------------------------------------------------------------

def _write_json(path: epath.Path, obj) -> None:
  path.write_bytes(json.dumps(obj, indent=2, ensure_ascii=False).encode('utf-8'))


def _special_map(tokenizer, names) -> dict:
  return {'unk_token': names[tokenizer.unk_id], 'sep_token': names[tokenizer.sep_id],
          'pad_token': names[tokenizer.pad_id], 'cls_token': names[tokenizer.cls_id],
          'mask_token': names[tokenizer.mask_id]}


def hf_tokenizer(tokenizer):
  """(a `tokenizers.Tokenizer` giving our ids with [CLS] and [SEP] added, the token names): WordPiece
  with BERT's normalizer for the WordPiece and session tokenizers (the event-type tokens special),
  a WordLevel model over single characters for the char and domain tokenizers."""
  from tokenizers import AddedToken, Regex, Tokenizer  # pylint: disable=import-outside-toplevel
  from tokenizers import decoders, models, normalizers, pre_tokenizers, processors  # pylint: disable=import-outside-toplevel
  from mlm_jax.data.tokenizers import SPECIAL_TOKENS  # pylint: disable=import-outside-toplevel
  if tokenizer.kind in ('wordpiece', 'session'):
    # Piece names must be unique: a repeated piece (the session vocabulary repeats [PAD]..[MASK]
    # past the structural ids) keeps the first id, as our tokenizer does, and its later ids get
    # names no text produces.
    names, seen = [], set()
    for i, piece in enumerate(tokenizer.pieces):
      names.append(piece if piece not in seen else f'[unused{i}]')
      seen.add(piece)
    hf = Tokenizer(models.WordPiece({p: i for i, p in enumerate(names)}, unk_token='[UNK]',
                                    max_input_chars_per_word=100))
    hf.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                               strip_accents=None, lowercase=tokenizer.lowercase)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.decoder = decoders.WordPiece()
    specials = getattr(tokenizer, 'structural', SPECIAL_TOKENS)  # session: + the [E:type] tokens
  elif tokenizer.kind in ('char', 'domain'):
    names = list(SPECIAL_TOKENS) + list(tokenizer.alphabet)
    hf = Tokenizer(models.WordLevel({p: i for i, p in enumerate(names)}, unk_token='[UNK]'))
    if tokenizer.lowercase:
      hf.normalizer = normalizers.Lowercase()
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r'[\s\S]'), behavior='isolated')  # characters
    hf.decoder = decoders.Fuse()
    specials = list(SPECIAL_TOKENS)
  else:
    raise ExportError(f'no tokenizer.json for a {tokenizer.kind!r} tokenizer')
  cls, sep = names[tokenizer.cls_id], names[tokenizer.sep_id]
  hf.post_processor = processors.TemplateProcessing(
      single=f'{cls} $A {sep}', pair=f'{cls} $A {sep} $B:1 {sep}:1',
      special_tokens=[(cls, tokenizer.cls_id), (sep, tokenizer.sep_id)])
  hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
  return hf, names


def write_tokenizer(tokenizer, out_dir: str, max_len: int, token_types: bool = True) -> bool:
  """Tokenizer files transformers loads: tokenizer.json (our ids, as `hf_tokenizer`), its
  tokenizer_config.json and special_tokens_map.json; vocab.txt too for WordPiece (a BertTokenizer).
  `token_types=False`: the model takes no token_type_ids (ModernBERT), so the tokenizer gives none.
  Returns whether it wrote any."""
  out = epath.Path(out_dir)
  if tokenizer.kind not in ('wordpiece', 'char', 'domain', 'session'):
    return False
  hf, names = hf_tokenizer(tokenizer)
  (out / hf_inputs.TOKENIZER_FILE).write_bytes(hf.to_str(pretty=True).encode('utf-8'))
  special = _special_map(tokenizer, names)
  if tokenizer.kind == 'wordpiece':  # a BertTokenizer, with its vocab.txt as well
    (out / 'vocab.txt').write_bytes(('\n'.join(tokenizer.pieces) + '\n').encode('utf-8'))
    tokenizer_config = {'tokenizer_class': 'BertTokenizer', 'do_lower_case': tokenizer.lowercase,
                        'strip_accents': None, 'tokenize_chinese_chars': True,
                        'do_basic_tokenize': True, **special}
  else:
    tokenizer_config = {'tokenizer_class': 'PreTrainedTokenizerFast', **special}
  tokenizer_config.update(model_max_length=max_len, clean_up_tokenization_spaces=False)
  if not token_types:
    tokenizer_config['model_input_names'] = ['input_ids', 'attention_mask']
  _write_json(out / 'tokenizer_config.json', tokenizer_config)
  _write_json(out / 'special_tokens_map.json', special)
  return True


def inputs_spec(config: dict, tokenizer, fold: dict) -> dict:
  """mlm_inputs.json: what mlm_inputs.py needs to build a batch as training does."""
  kind = tokenizer.kind if tokenizer.kind in ('domain', 'session') else 'text'
  spec = {'kind': kind, 'tokenizer': tokenizer.kind, 'max_len': config['model']['max_len'],
          'pad_id': tokenizer.pad_id, 'unk_id': tokenizer.unk_id, 'cls_id': tokenizer.cls_id,
          'sep_id': tokenizer.sep_id, 'mask_id': tokenizer.mask_id, 'fold': fold}
  if kind == 'domain':
    from mlm_jax.data import domains  # pylint: disable=import-outside-toplevel
    spec['domain'] = {'part': config['data'].get('domain_part', 'registrable'),
                      'tlds': list(tokenizer.tlds), 'publicsuffixlist': domains.psl_version()}
  if kind == 'session':
    spec['session'] = {'text_offset': tokenizer.text_offset,
                       'event_types': list(tokenizer.event_types),
                       'first_type_id': tokenizer.type_token[tokenizer.event_types[0]]}
  return spec


def _copy_file(src: str, dst: epath.Path) -> None:
  with open(src, 'rb') as f:
    dst.write_bytes(f.read())


# --- StableHLO ------------------------------------------------------------------------------------

def _flatten(tree: dict, prefix: str = '') -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = np.ascontiguousarray(v, np.float32)
  return out


def _unflatten(flat: dict) -> dict:
  out = {}
  for key, v in flat.items():
    *parents, leaf = key.split('.')
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


def serving_forward(config: dict, fold: dict):
  """forward(params {dotted name: array}, {'input_ids', 'attention_mask', 'token_type_ids'} int32
  [B, L]) -> float32 logits [B, L, V]: our model, one record per row, token types unfolded."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from mlm_jax import rundir  # pylint: disable=import-outside-toplevel
  cfg = dataclasses.replace(rundir.model_config(config, 'float32'), attention_impl='xla',
                            remat_policy='none', scan_layers=True)

  def forward(params, inputs):
    # float32 matmuls stay float32 on every platform (GPUs would otherwise use TF32).
    with jax.default_matmul_precision('highest'):
      return logits(params, inputs)

  def logits(params, inputs):
    model = rundir.make_model(cfg, _unflatten(params))
    ids_BL = inputs['input_ids']
    b, l = ids_BL.shape
    types_BL, features = hf_inputs.unfold({'fold': fold}, inputs['token_type_ids'])
    positions_BL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    batch = {'input_ids': ids_BL, 'segment_ids': inputs['attention_mask'],
             'positions': positions_BL, 'token_type_ids': types_BL, **features,
             'mlm_positions': positions_BL}  # every position is a prediction slot
    return model(batch)

  return jax.jit(forward)


def export_stablehlo(params: dict, config: dict, fold: dict, out: epath.Path,
                     platforms: tuple[str, ...]) -> None:
  """model.jax_export (batch and length symbolic) and params.npz."""
  import io  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  flat = _flatten(params)
  b, l = jax.export.symbolic_shape('b, l')
  ints = jax.ShapeDtypeStruct((b, l), np.int32)
  exported = jax.export.export(serving_forward(config, fold), platforms=platforms)(
      {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()},
      {'input_ids': ints, 'attention_mask': ints, 'token_type_ids': ints})
  (out / EXPORT_FILE).write_bytes(exported.serialize())
  buf = io.BytesIO()
  np.savez(buf, **flat)
  (out / PARAMS_FILE).write_bytes(buf.getvalue())


# --- the export -----------------------------------------------------------------------------------

def _eval_metrics(run, step: int, meta: dict) -> tuple[int | None, dict]:
  """(step, eval metrics) saved with the step; else the run's last eval at or before it."""
  from mlm_jax import rundir  # pylint: disable=import-outside-toplevel
  saved = {k: v for k, v in ((meta.get('checkpoint_info') or {}).get('metrics') or {}).items()
           if k.startswith('eval/')}
  if saved:
    return step, saved
  if run.run is None or not (run.run / rundir.METRICS_FILE).exists():
    return None, {}
  by_step = {}
  for name, (steps, values) in rundir.read_metrics(run.run).items():
    if name.startswith('eval/'):
      for s, v in zip(steps, values):
        if s <= step:
          by_step.setdefault(s, {})[name] = v
  last = max(by_step, default=None)
  return last, by_step.get(last, {})


def export(workdir: str, out_dir: str, step: int | None = None,
           drop_extra_embeddings: bool = False, fmt: str = 'safetensors',
           platforms: tuple[str, ...] = PLATFORMS) -> dict:
  """Writes the export directory; returns {'step', 'warnings', 'tokenizer', 'files'}."""
  from mlm_jax import rundir  # pylint: disable=import-outside-toplevel
  from tools import model_card  # pylint: disable=import-outside-toplevel

  if fmt not in FORMATS:
    raise ExportError(f'--format={fmt!r}: expected one of {", ".join(FORMATS)}')
  if fmt == 'stablehlo' and importlib.util.find_spec('flatbuffers') is None:
    raise ExportError('--format=stablehlo: jax.export serialization needs the flatbuffers package '
                      '(pip install flatbuffers)')
  run = rundir.resolve(workdir)
  step = rundir.choose_step(run, step)
  config = rundir.find_config(run, step)
  tokenizer = rundir.load_tokenizer(run, step)
  drop = drop_extra_embeddings and fmt == 'safetensors'
  fold = token_type_fold(config, tokenizer, drop)
  # Refuse before reading any array.
  warnings = check_exportable(config, drop, fold) if fmt == 'safetensors' else []
  params, meta = rundir.read_params(run, step)
  out = epath.Path(out_dir)  # local or gs://, like the run
  out.mkdir(parents=True, exist_ok=True)
  if fmt == 'safetensors':
    from safetensors.numpy import save  # pylint: disable=import-outside-toplevel
    if is_modernbert(config):
      tensors = hf_modernbert.hf_state_dict(params, config['model'])
      hf = hf_modernbert.hf_config(config['model'], {'pad': tokenizer.pad_id,
                                                     'cls': tokenizer.cls_id,
                                                     'sep': tokenizer.sep_id})
    else:
      tensors, hf = hf_state_dict(params, config, fold), hf_config(config, tokenizer.pad_id, fold)
    (out / 'model.safetensors').write_bytes(save(tensors, metadata={'format': 'pt'}))
    _write_json(out / 'config.json', hf)
    exported_params = sum(v.size for v in tensors.values())
  else:
    export_stablehlo(params, config, fold, out, tuple(platforms))
    _copy_file(os.path.join(_HERE, RUNNER), out / RUNNER)
    exported_params = sum(np.size(v) for v in _flatten(params).values())
  wrote_tokenizer = write_tokenizer(tokenizer, out_dir, config['model']['max_len'],
                                    token_types=not is_modernbert(config))
  if not wrote_tokenizer:
    warnings.append(f'the {tokenizer.kind} tokenizer has no Hugging Face equivalent: no tokenizer '
                    'files written.')
  _write_json(out / hf_inputs.SPEC_FILE, inputs_spec(config, tokenizer, fold))
  _copy_file(hf_inputs.__file__, out / INPUTS_MODULE)
  _write_json(out / CONFIG_FILE, config)
  eval_step, metrics = _eval_metrics(run, step, meta)
  card = model_card.render(model_card.Facts(
      step=step, fmt=fmt, config=config, tokenizer=tokenizer, fold=fold,
      param_counts=meta.get('param_counts') or {}, exported_params=int(exported_params),
      eval_step=eval_step, eval_metrics=metrics, dropped_extra=drop, platforms=tuple(platforms)))
  (out / 'README.md').write_bytes(card.encode('utf-8'))
  files = sorted(p.name for p in out.iterdir())
  return {'step': step, 'warnings': warnings, 'tokenizer': wrote_tokenizer, 'files': files}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('workdir', nargs='?', help='run directory (config.json, tokenizer/, '
                      'checkpoints/) or one checkpoint step directory of it')
  parser.add_argument('out', help='output directory for the exported files')
  parser.add_argument('--checkpoint', default=None, help='instead of WORKDIR: a checkpoint step '
                      'directory (RUN_DIR/checkpoints/STEP, or a copy of one anywhere) or a run '
                      'directory')
  parser.add_argument('--step', type=int, default=None, help='checkpoint step (default: best, else newest)')
  parser.add_argument('--format', default='safetensors', choices=FORMATS,
                      help='safetensors: a transformers BertForMaskedLM (ModernBertForMaskedLM) '
                      'directory; stablehlo: a '
                      'serialized jax.export of the fill-mask forward pass + params.npz')
  parser.add_argument('--platforms', default=','.join(PLATFORMS),
                      help='--format=stablehlo: comma-separated platforms to lower for (cpu, cuda, '
                      'rocm, tpu)')
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
  platforms = tuple(p.strip() for p in args.platforms.split(',') if p.strip())
  try:
    result = export(args.workdir, args.out, args.step, args.drop_extra_embeddings, args.format,
                    platforms)
  except (ExportError, CheckpointError, DataError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for w in result['warnings']:
    print(f'warning: {w}', file=sys.stderr)
  print(f'exported step {result["step"]} of {args.workdir} to {args.out} ({args.format})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
