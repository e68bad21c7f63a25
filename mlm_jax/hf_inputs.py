"""Model inputs for an mlm_jax export, for transformers or the StableHLO artifact.

Self-contained on purpose (numpy and `tokenizers`; `publicsuffixlist` for a domain model;
`transformers` only for the fill-mask pipeline): tools/export_hf.py copies this file into every
export directory as mlm_inputs.py, next to mlm_inputs.json (what it needs to know about the run),
so a user needs no mlm_jax.

Why token_type_ids carry more than token types: our models add per-record or per-token categorical
embeddings (DomainBERT's TLD, the session model's event type) to the word, position and token-type
embeddings before the first LayerNorm. BERT has one such input, so the export folds them all into
its token-type table: row (a, f1, f2, ...) = type[a] + extra1[f1] + extra2[f2] + ..., numbered in
mixed radix with the token type most significant and the features in name order. A model that
never uses token types (char and domain tokenizers: always type 0) folds type 0 alone, so for
DomainBERT the HF token type IS the TLD id.

  from mlm_inputs import model_inputs, fill_mask
  batch = model_inputs(['exam[MASK]le.com', 'wiki[MASK]edia.org'], EXPORT_DIR)  # numpy arrays
  logits = AutoModelForMaskedLM.from_pretrained(EXPORT_DIR)(**{k: torch.tensor(v) ...}).logits
  fill_mask(EXPORT_DIR)('exam[MASK]le.com')   # transformers' fill-mask pipeline, token types set

A domain model reads the name as training did: normalized (lower case, IDNA, URL host, no trailing
dot), split at its public suffix (ICANN section of publicsuffixlist's bundled list), the label left
of it ('registrable') or the whole host ('host') as characters, the suffix as a TLD id (its place
in the run's TLD vocabulary; 1 = any other suffix). A session model reads
'[E:search] wireless headphones [E:view] sony wh-1000' (`session_text` builds it from events).
"""
import functools
import json
import os
import re

import numpy as np

SPEC_FILE = 'mlm_inputs.json'
TOKENIZER_FILE = 'tokenizer.json'
MASK = '[MASK]'
PAD_TLD, OTHER_TLD = 0, 1
_NAME = re.compile(r'[a-z0-9-]+(\.[a-z0-9-]+)*')


def load_spec(model_dir: str) -> dict:
  """mlm_inputs.json of an export directory."""
  with open(os.path.join(model_dir, SPEC_FILE), encoding='utf-8') as f:
    return json.load(f)


def fold(spec: dict, token_type_ids, features: dict):
  """HF token_type_ids from our token types and extra features (arrays of one shape)."""
  out = np.asarray(token_type_ids, np.int64)
  if np.any((out < 0) | (out >= spec['fold']['token_types'])):
    raise ValueError(f"token types must lie in [0, {spec['fold']['token_types']})")
  for name, size in spec['fold']['features']:
    values = np.asarray(features[name], np.int64)
    if np.any((values < 0) | (values >= size)):
      raise ValueError(f'feature {name!r} must lie in [0, {size})')
    out = out * size + values
  return out


def unfold(spec: dict, hf_token_type_ids):
  """(our token types, {feature: values}) of folded ids; numpy or jax arrays alike."""
  rest, features = hf_token_type_ids, {}
  for name, size in reversed(spec['fold']['features']):
    features[name] = rest % size
    rest = rest // size
  return rest, features


# --- domain names: the split training uses (mlm_jax/data/domains.py) -----------------------------

@functools.lru_cache(maxsize=1)
def _psl():
  from publicsuffixlist import PublicSuffixList  # pylint: disable=import-outside-toplevel
  return PublicSuffixList(only_icann=True, accept_unknown=False)


def normalize(name: str):
  """Lower-case ASCII (IDNA/punycode) form of a host name, or None if it is not one."""
  name = name.strip().lower()
  if name.endswith('.'):
    name = name[:-1]
  if '://' in name:
    name = name.split('://', 1)[1].split('/', 1)[0].split(':', 1)[0]
  if not name.isascii():
    try:
      name = name.encode('idna').decode('ascii')
    except UnicodeError:
      return None
  if not _NAME.fullmatch(name) or len(name) > 253 or any(len(p) > 63 for p in name.split('.')):
    return None
  return name


def split_domain(name: str, part: str = 'registrable'):
  """(the text the model reads, public suffix) of a host name, or None: 'www.example.co.uk' ->
  ('example', 'co.uk'), or ('www.example', 'co.uk') for part='host'."""
  name = normalize(name)
  if name is None:
    return None
  suffix = _psl().publicsuffix(name)
  if suffix is None or len(suffix) >= len(name):
    return None
  host = name[:-len(suffix) - 1]
  return (host.rsplit('.', 1)[-1] if part == 'registrable' else host), suffix


def domain_text(spec: dict, name: str) -> tuple[str, int]:
  """(text for the tokenizer, TLD id) of a domain name that may hold [MASK]s left of its suffix:
  'Exam[MASK]le.COM' -> ('exam[MASK]le', id of 'com')."""
  part = spec['domain']['part']
  # Two probes (the masks as 'a', then as 'b') go through the same normalization, so they line
  # up character by character and differ exactly where the masks are.
  a, b = split_domain(name.replace(MASK, 'a'), part), split_domain(name.replace(MASK, 'b'), part)
  if a is None or b is None:
    raise ValueError(f'{name!r} is not a host name with a known public suffix')
  if a[1] != b[1] or len(a[0]) != len(b[0]):
    raise ValueError(f'{name!r}: a {MASK} must stand for one character left of the public suffix')
  masks = [i for i, (x, y) in enumerate(zip(a[0], b[0])) if x != y]
  if len(masks) != name.count(MASK):
    raise ValueError(f'{name!r}: a {MASK} must stand for one character of the text the model reads')
  text = ''.join(MASK if i in masks else c for i, c in enumerate(a[0]))
  tlds = spec['domain']['tlds']
  tld = tlds.index(a[1]) + 2 if a[1] in tlds else OTHER_TLD
  return text, tld


# --- event sessions -------------------------------------------------------------------------------

def session_text(events: list, spec: dict | None = None) -> str:
  """A session's events ([{'type': ..., 'text': ...}, ...]) as the text a session model reads:
  '[E:search] wireless headphones [E:view] ...'. With `spec`, events training would skip (a type
  outside the model's event types, a text that is not a string) are left out as well."""
  known = None if spec is None else set(spec['session']['event_types'])
  keep = [e for e in events if isinstance(e, dict) and isinstance(e.get('text', ''), str)
          and (known is None or e.get('type') in known)]
  return ' '.join(f"[E:{e['type']}] {e.get('text', '')}".strip() for e in keep)


def _session_types(spec: dict, ids) -> tuple[np.ndarray, np.ndarray]:
  """Per token: token type (1 on text pieces and [MASK], else 0) and event type (1 + the type's
  index from its [E:type] token on, 0 on [CLS]/[SEP]/padding), as training assigns them."""
  s = spec['session']
  ids = np.asarray(ids, np.int64)
  types = ((ids >= s['text_offset']) | (ids == spec['mask_id'])).astype(np.int64)
  first_type = s['first_type_id']
  events = np.zeros(len(ids), np.int64)
  current = 0
  for i, t in enumerate(ids.tolist()):
    if first_type <= t < first_type + len(s['event_types']):
      current = t - first_type + 1
    events[i] = 0 if t in (spec['cls_id'], spec['sep_id'], spec['pad_id']) else current
  return types, events


# --- batches --------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _tokenizer(model_dir: str):
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
  return Tokenizer.from_file(os.path.join(model_dir, TOKENIZER_FILE))


def encode_with(tokenizer):
  """texts -> token id lists with [CLS]/[SEP], for a `tokenizers.Tokenizer` or a transformers one."""
  if hasattr(tokenizer, 'encode_batch'):
    return lambda texts: [e.ids for e in tokenizer.encode_batch(list(texts))]
  return lambda texts: tokenizer(list(texts))['input_ids']


def model_inputs(texts: list, model_dir: str, features: dict | None = None, spec: dict | None = None,
                 encode=None) -> dict:
  """{'input_ids', 'token_type_ids', 'attention_mask'}: int64 [B, L] numpy arrays, padded to the
  longest text. texts: domain names (domain model), session texts (session model) or plain texts;
  [MASK] marks a slot to fill. features: for a text model with extra embeddings, {name: one int per
  text} (per-record features). `encode` defaults to the directory's tokenizer.json."""
  spec = spec or load_spec(model_dir)
  encode = encode or encode_with(_tokenizer(model_dir))
  kind, features = spec['kind'], dict(features or {})
  texts = list(texts)
  per_record = {name: [0] * len(texts) for name, _ in spec['fold']['features']}
  for name, values in features.items():
    if name not in per_record:
      raise ValueError(f'unknown feature {name!r}; this model has {sorted(per_record) or "none"}')
    per_record[name] = [int(v) for v in values]
  if kind == 'domain':
    texts, tlds = zip(*[domain_text(spec, n) for n in texts]) if texts else ((), ())
    if 'tld' in per_record:
      per_record['tld'] = list(tlds)
  ids = encode(texts)
  if too_long := [len(x) for x in ids if len(x) > spec['max_len']]:
    raise ValueError(f"a text is {max(too_long)} tokens with [CLS]/[SEP]; the model takes at most "
                     f"{spec['max_len']}")
  b, l = len(ids), max(map(len, ids), default=0)
  out = {'input_ids': np.full((b, l), spec['pad_id'], np.int64),
         'token_type_ids': np.zeros((b, l), np.int64),
         'attention_mask': np.zeros((b, l), np.int64)}
  for r, x in enumerate(ids):
    n = len(x)
    out['input_ids'][r, :n] = x
    out['attention_mask'][r, :n] = 1
    if kind == 'session':
      types, events = _session_types(spec, x)
      row = {name: events if name == 'event_type' else np.full(n, per_record[name][r])
             for name, _ in spec['fold']['features']}
    else:  # per-record features on every token, [CLS]/[SEP] included
      types = np.zeros(n, np.int64)
      row = {name: np.full(n, per_record[name][r]) for name, _ in spec['fold']['features']}
    out['token_type_ids'][r, :n] = fold(spec, types, row)
  return out


# --- transformers' fill-mask pipeline -------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def pipeline_class():
  """A FillMaskPipeline whose inputs get their token_type_ids (a plain fill-mask pipeline sends
  zeros: for DomainBERT that is TLD 0, padding). The model directory (its name_or_path) must hold
  mlm_inputs.json. Use: transformers.pipeline('fill-mask', model=DIR,
  pipeline_class=pipeline_class()), or `fill_mask(DIR)`."""
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import FillMaskPipeline  # pylint: disable=import-outside-toplevel

  class MlmJaxFillMask(FillMaskPipeline):
    """Fill-mask with token_type_ids built as training builds them (see mlm_inputs.py)."""

    def preprocess(self, inputs, return_tensors=None, tokenizer_kwargs=None, **kwargs):
      del return_tensors, tokenizer_kwargs, kwargs
      model_dir = self.model.name_or_path
      arrays = model_inputs([inputs], model_dir, encode=encode_with(self.tokenizer))
      model_inputs_ = {k: torch.tensor(v) for k, v in arrays.items()}
      self.ensure_exactly_one_mask_token(model_inputs_)
      return model_inputs_

  return MlmJaxFillMask


def fill_mask(model_dir: str, **kwargs):
  """transformers' fill-mask pipeline over an export directory, with our token types."""
  from transformers import pipeline  # pylint: disable=import-outside-toplevel
  return pipeline('fill-mask', model=model_dir, pipeline_class=pipeline_class(), **kwargs)
