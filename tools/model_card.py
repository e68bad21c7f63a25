"""The README.md model card tools/export_hf.py writes into an export directory.

Everything in it is read from the run (resolved config, checkpoint metadata, tokenizer, metrics), not
typed by hand: architecture and size, the training data as configured with data.license, steps and
tokens seen, the final eval metrics, the tokenizer, and how to load the export and fill a mask.
"""
import dataclasses
import math

_EXAMPLES = {'domain': 'exam[MASK]le.com',
             'session': '[E:search] wireless [MASK] [E:view] wireless headphones',
             'text': 'the king [MASK] to the tower .'}


@dataclasses.dataclass(frozen=True)
class Facts:
  step: int
  fmt: str  # 'safetensors' or 'stablehlo'
  config: dict  # the run's resolved config
  tokenizer: object  # mlm_jax.data.Tokenizer
  fold: dict  # export_hf.token_type_fold
  param_counts: dict  # checkpoint metadata: {'total', 'encoder'}
  exported_params: int  # numbers in the exported weights
  eval_step: int | None
  eval_metrics: dict
  dropped_extra: bool = False
  platforms: tuple[str, ...] = ()


def _kind(tokenizer) -> str:
  return tokenizer.kind if tokenizer.kind in ('domain', 'session') else 'text'


def _architecture(f: Facts) -> list[str]:
  m = f.config['model']
  extra = dict(m.get('extra_embeddings') or {})
  total = f.param_counts.get('total')
  size = (f'{total:,} parameters ({f.param_counts.get("encoder", 0):,} in the encoder blocks)'
          if total else f'{f.exported_params:,} parameters')
  if m.get('arch', 'bert') == 'modernbert':
    what = ("ModernBERT (transformers' ModernBertForMaskedLM: rotary embeddings, bias-free pre-LN, "
            f"GeGLU; global attention on layers i % {m['global_attn_every_n_layers']} == 0, a "
            f"window of ±{m['local_attention'] // 2} tokens on the others)")
  else:
    what = f"BERT ({m['layer_norm']}-LN, exact GELU)"
  lines = ['## Architecture and size', '',
           f'{what} with a masked-language-model head tied to the word embeddings: {size}.', '',
           '| layers | hidden | heads | feed-forward | max length | vocabulary | token types |',
           '|---|---|---|---|---|---|---|',
           f"| {m['num_layers']} | {m['hidden_size']} | {m['num_heads']} | "
           f"{m['intermediate_size']} | {m['max_len']} | {m['vocab_size']} | "
           f"{m['type_vocab_size']} |", '']
  if extra:
    names = ', '.join(f'`{k}` ({v} ids)' for k, v in sorted(extra.items()))
    if f.dropped_extra:
      lines.append(f'Extra embeddings {names} were DROPPED from this export: its outputs differ '
                   'from the trained model\'s.')
    elif f.fmt == 'safetensors':
      rows = f.fold['token_types'] * math.prod(s for _, s in f.fold['features'])
      order = ', '.join(['token type'] * (f.fold['token_types'] > 1) + [n for n, _ in f.fold['features']])
      lines.append(f'Extra embeddings {names} are added to the token embeddings before the first '
                   'LayerNorm; BERT has one such input, so they are folded into '
                   f'`token_type_embeddings`: {rows:,} rows, one per combination of ({order}), '
                   'numbered in mixed radix (first most significant). `mlm_inputs.py` computes '
                   'the ids.')
    else:
      lines.append(f'Extra embeddings {names} enter through `token_type_ids`, folded as for the '
                   'transformers export (see `mlm_inputs.py`).')
    lines.append('')
  return lines


def _data(f: Facts) -> list[str]:
  d = f.config['data']
  source = d.get('source', 'text')
  lines = ['## Training data', '', f'- source: `{source}`']
  if source == 'tfds':
    keys = ('tfds_name', 'tfds_data_dir', 'tfds_train_split', 'tfds_eval_split')
  elif source == 'hf':
    keys = ('hf_path', 'hf_name', 'hf_data_files', 'hf_split', 'hf_eval_split', 'text_field')
  else:
    keys = ('train_files', 'eval_files')
  for k in keys:
    if d.get(k):
      lines.append(f'- {k}: `{d[k]}`')
  if not d.get('eval_files' if source not in ('tfds', 'hf') else f'{source}_eval_split'):
    lines.append(f"- eval: carved out of the training data by hash (eval_fraction "
                 f"{d.get('eval_fraction')})")
  if d.get('max_records'):
    lines.append(f"- at most {d['max_records']:,} records read (data.max_records)")
  if any('{assets}' in str(d.get(k, '')) for k in keys):
    lines.append('- `{assets}` = the data shipped in the mlm_jax package (mlm_jax/assets)')
  license_ = d.get('license') or 'not stated (the run\'s data.license was empty)'
  lines += [f'- license: {license_}', '']
  return lines


def _training(f: Facts) -> list[str]:
  c = f.config
  t, o, m, d = c['train'], c['optimizer'], c['model'], c['data']
  lines = ['## Training', '', f"- steps: {f.step:,} (of train.steps = {t['steps']:,})"]
  batch = t.get('batch_size')
  if isinstance(batch, int):
    lines.append(f"- seen: {f.step * batch:,} rows of {m['max_len']} token positions = "
                 f"{f.step * batch * m['max_len']:,} token positions (batch size {batch}; "
                 f"{'packed rows, ' if d.get('packing') else ''}padding included)")
  lines.append(f"- optimizer: AdamW, learning rate {o.get('learning_rate')} ({o.get('schedule')} "
               f"schedule, {o.get('warmup_steps')} warmup steps), weight decay "
               f"{o.get('weight_decay')}")
  lines.append(f"- masking: {d.get('mask_rate')} of the tokens ({d.get('mask_mode')}), seed "
               f"{c.get('seed')}")
  lines.append('')
  return lines


def _evaluation(f: Facts) -> list[str]:
  if not f.eval_metrics:
    return ['## Evaluation', '', 'No evaluation was recorded at or before this step.', '']
  lines = ['## Evaluation', '', f'Held-out split, at step {f.eval_step:,}:', '',
           '| metric | value |', '|---|---|']
  for k, v in sorted(f.eval_metrics.items()):
    lines.append(f'| {k} | {v:.6g} |' if isinstance(v, float) else f'| {k} | {v} |')
  return lines + ['']


def _tokenizer(f: Facts) -> list[str]:
  tok = f.tokenizer
  specials = '[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4'
  if tok.kind in ('char', 'domain'):
    text = (f'One token per character of `{tok.alphabet}` (ids: {specials}, then the alphabet in '
            f'order; any other character is [UNK]), lowercase={tok.lowercase}.')
  elif tok.kind == 'session':
    text = (f'Structural tokens ({specials}, then one `[E:type]` token per event type: '
            f'{", ".join(tok.event_types)}) followed by {tok.text.vocab_size:,} WordPiece pieces; '
            'text pieces are token type 1, structural tokens 0; each token also carries its '
            'event\'s type.')
  else:
    text = f'BERT WordPiece, {tok.vocab_size:,} pieces, lowercase={tok.lowercase}.'
  lines = ['## Tokenizer', '', text + ' `tokenizer.json` reproduces the ids (AutoTokenizer loads '
           'it); [CLS] and [SEP] are added around each text.']
  if tok.kind == 'domain':
    d = f.config['data']
    lines += ['', f"A name is read as in training: normalized, split at its public suffix (ICANN "
              f"section of the publicsuffixlist package's bundled list), the "
              f"{'label left of the suffix' if d.get('domain_part') == 'registrable' else 'host'} "
              f'as characters, the suffix as a TLD id: its place in the run\'s TLD vocabulary '
              f'({len(tok.tlds):,} suffixes in mlm_inputs.json; 0 = padding, 1 = any other '
              'suffix). With DomainBERT\'s folding the TLD id is the token type.']
  return lines + ['']


def _use(f: Facts) -> list[str]:
  kind = _kind(f.tokenizer)
  example = _EXAMPLES[kind]
  lines = ['## Use', '']
  needs = 'pip install numpy tokenizers' + (' publicsuffixlist' if kind == 'domain' else '')
  if f.fmt == 'safetensors':
    lines += ['```python', 'import sys, torch', "sys.path.insert(0, 'EXPORT_DIR')  # mlm_inputs.py",
              'from transformers import AutoModelForMaskedLM', 'from mlm_inputs import fill_mask, model_inputs', '',
              f"print(fill_mask('EXPORT_DIR')({example!r}))  # top 5: token_str, score",
              "model = AutoModelForMaskedLM.from_pretrained('EXPORT_DIR').eval()",
              f"batch = model_inputs([{example!r}], 'EXPORT_DIR')  # input_ids, token_type_ids, "
              'attention_mask',
              'logits = model(**{k: torch.tensor(v) for k, v in batch.items()}).logits', '```', '']
    plain = ('A plain `pipeline("fill-mask", model="EXPORT_DIR")` works for this model too.'
             if not f.fold['features'] and kind == 'text' else
             'A plain `pipeline("fill-mask", model="EXPORT_DIR")` runs but sends token_type_ids '
             'of 0 (for a domain model: the padding TLD), so its predictions are not the trained '
             'model\'s: `fill_mask` is that pipeline with token_type_ids built as training builds '
             'them (`transformers.pipeline("fill-mask", model=DIR, pipeline_class='
             'mlm_inputs.pipeline_class())`).')
    lines += [plain, '']
  else:
    lines += ['Needs jax (with `flatbuffers`, for deserializing) and numpy only: no mlm_jax, no flax. '
              'Platforms: '
              f"{', '.join(f.platforms)}.", '', '```python', 'import jax, numpy as np',
              "exported = jax.export.deserialize(open('EXPORT_DIR/model.jax_export', 'rb').read())",
              "params = dict(np.load('EXPORT_DIR/params.npz'))",
              '# int32 [batch, length] each, length <= max length; logits: float32 [batch, length, vocabulary]',
              "logits = exported.call(params, {'input_ids': ids, 'attention_mask': mask, "
              "'token_type_ids': types})", '```', '',
              f"`python EXPORT_DIR/stablehlo_run.py EXPORT_DIR {example!r}` prints the top 5 per "
              '[MASK]; `mlm_inputs.model_inputs(texts, EXPORT_DIR)` builds the three arrays.', '']
  lines += [f'Building inputs ({needs}): `mlm_inputs.model_inputs(texts, EXPORT_DIR)` gives '
            'input_ids, token_type_ids and attention_mask; ' + {
                'domain': 'texts are domain names (`exam[MASK]le.com`); token_type_ids = the TLD '
                          'id on every token.',
                'session': 'texts are sessions as `session_text(events)` writes them; '
                           'token_type_ids fold (token type, event type) per token.',
                'text': 'texts are plain texts' + (
                    '; per-record features go in `features={name: [one id per text]}`.'
                    if f.fold['features'] else '.')}[kind], '']
  return lines


def _files(f: Facts) -> list[str]:
  hf_class = ('ModernBertForMaskedLM' if f.config['model'].get('arch', 'bert') == 'modernbert'
              else 'BertForMaskedLM')
  model = (f'`config.json`, `model.safetensors`: {hf_class}, float32' if f.fmt == 'safetensors'
           else '`model.jax_export`: serialized jax.export (StableHLO); `params.npz`: float32 '
                'weights; `stablehlo_run.py`: loader')
  return ['## Files', '', f'- {model}',
          '- `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`: the tokenizer',
          '- `mlm_inputs.py`, `mlm_inputs.json`: input building (token ids, token types, features)',
          '- `mlm_jax_config.json`: the training run\'s resolved mlm_jax config', '']


def render(f: Facts) -> str:
  header = ['---', 'pipeline_tag: fill-mask', 'tags: [fill-mask, bert, mlm_jax]']
  if f.fmt == 'safetensors':
    header.append('library_name: transformers')
  header += ['---', '', f'# Masked language model from mlm_jax, step {f.step:,}', '',
             f'Exported by mlm_jax\'s `tools/export_hf.py --format={f.fmt}`.', '']
  body = (_architecture(f) + _data(f) + _training(f) + _evaluation(f) + _tokenizer(f) + _use(f)
          + _files(f))
  return '\n'.join(header + body)
