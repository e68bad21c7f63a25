"""Fill in the blanks with a trained checkpoint: top-k predictions for every [MASK] in the text.

  python -m mlm_jax.predict --workdir=DIR "the king [MASK] to the tower ."
  python -m mlm_jax.predict --checkpoint=DIR/checkpoints/STEP "the king [MASK] to the tower ."
  python -m mlm_jax.predict --workdir=DIR --top_k=3 "exam[MASK]le.com" --feature=tld=17

Runs on the CPU in float32. `[MASK]` in the text marks a prediction slot, for the char tokenizer
too. Several texts are one batch (one row each). `--step` defaults to the best checkpoint (by the
run's checkpoint.best_metric) if one was ranked, else the newest. A checkpoint step directory is
enough on its own (it holds its config and tokenizer), wherever it was copied to.
"""
import dataclasses
import os
import re

if __name__ == '__main__':  # a program, not an import: never grab an accelerator
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # before jax is imported

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from flax import nnx  # noqa: E402

from mlm_jax import model as model_lib  # noqa: E402
from mlm_jax import errors, rundir  # noqa: E402
from mlm_jax.checkpoint import CheckpointError  # noqa: E402
from mlm_jax.errors import DataError  # noqa: E402

MASK = '[MASK]'


def inference_config(config: dict) -> model_lib.BertConfig:
  """The BertConfig of a resolved config dict, for inference on the CPU in float32."""
  cfg = rundir.model_config(config, 'float32')
  # scan: one compiled layer body, so a deep model compiles in a second or two (same numbers).
  return dataclasses.replace(cfg, attention_impl='xla', remat_policy='none', scan_layers=True)


class Predictor:
  """A checkpoint and its tokenizer, ready to fill in masks."""

  def __init__(self, workdir: str, step: int | None = None):
    """`workdir`: a run directory or one checkpoint step directory."""
    run = rundir.load(workdir, step)
    self.step, self.config, self.tokenizer = run.step, run.config, run.tokenizer
    self.cfg = inference_config(self.config)
    graphdef, state = nnx.split(rundir.make_model(self.cfg, run.params))
    self._logits = jax.jit(lambda state, batch: nnx.merge(graphdef, state)(batch))
    self._state = state

  def encode(self, text: str) -> np.ndarray:
    """Token ids of `text` with [CLS]/[SEP]; each literal [MASK] becomes the mask id."""
    tok = self.tokenizer
    parts = text.split(MASK)
    ids = [tok.cls_id]
    for i, part in enumerate(parts):
      if part:
        ids.extend(int(x) for x in tok.encode_batch([part])[0])
      if i < len(parts) - 1:
        ids.append(tok.mask_id)
    ids.append(tok.sep_id)
    return np.asarray(ids, np.int32)

  def domain_input(self, text: str) -> tuple[str, int]:
    """A domain model reads the name left of the public suffix, and the suffix as its TLD id:
    'exam[MASK]le.com' -> ('exam[MASK]le', id of 'com'), as in training (data.domain_part)."""
    from mlm_jax.data import domains
    part = self.config['data'].get('domain_part', 'registrable')
    # Normalized as training normalizes (case, trailing dot, URL, IDNA): two probes, the masks read
    # as 'a' and as 'b', line up character by character and differ exactly at the masks.
    probes = [domains.split_name(text.replace(MASK, c)) for c in 'ab']
    if None in probes:
      raise ValueError(f'{text!r} is not a domain name with a known public suffix')
    (host_a, suffix), (host_b, suffix_b) = probes
    a, b = domains.record_text(host_a, part), domains.record_text(host_b, part)
    masks = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    if suffix != suffix_b or len(a) != len(b) or len(masks) != text.count(MASK):
      raise ValueError(f'{text!r}: each {MASK} must stand for one character of the text the model '
                       'reads, left of the public suffix')
    model_text = ''.join(MASK if i in masks else c for i, c in enumerate(a))
    return model_text, int(self.tokenizer.tld_ids([suffix])[0])

  def batch(self, texts: list[str], features: dict[str, int] | None = None) -> dict:
    """One row per text, padded to the longest; the mask slots as mlm_positions."""
    features = dict(features or {})
    extra = dict(self.cfg.extra_embeddings)
    if unknown := set(features) - set(extra):
      raise ValueError(f'unknown --feature {sorted(unknown)}; this model has {sorted(extra) or "none"}')
    per_row = [dict(features) for _ in texts]
    if hasattr(self.tokenizer, 'tld_ids'):  # a domain model: the TLD comes from the name
      texts = list(texts)
      for r, text in enumerate(texts):
        texts[r], tld = self.domain_input(text)
        if 'tld' in extra and 'tld' not in features:
          per_row[r]['tld'] = tld
    ids = [self.encode(t) for t in texts]
    max_len = self.cfg.max_len
    if too_long := [len(x) for x in ids if len(x) > max_len]:
      raise ValueError(f'text is {max(too_long)} tokens with [CLS]/[SEP]; the model takes at most {max_len}')
    slots = [np.flatnonzero(x == self.tokenizer.mask_id) for x in ids]
    if any(len(s) == 0 for s in slots):
      raise ValueError(f'each text needs at least one {MASK}')
    b, l, p = len(ids), max(map(len, ids)), max(map(len, slots))
    input_ids_BL = np.full((b, l), self.tokenizer.pad_id, np.int32)
    segment_ids_BL = np.zeros((b, l), np.int32)
    positions_BL = np.zeros((b, l), np.int32)
    mlm_positions_BP = np.zeros((b, p), np.int32)
    for r, (x, s) in enumerate(zip(ids, slots)):
      input_ids_BL[r, :len(x)] = x
      segment_ids_BL[r, :len(x)] = 1
      positions_BL[r, :len(x)] = np.arange(len(x))
      mlm_positions_BP[r, :len(s)] = s
    token_type_BL = np.zeros((b, l), np.int32)
    type_V = getattr(self.tokenizer, 'token_type_V', None)
    if type_V is not None:  # e.g. sessions: structural tokens 0, text tokens 1; masks are text
      token_type_BL = np.where(input_ids_BL == self.tokenizer.mask_id, 1,
                               type_V[input_ids_BL]).astype(np.int32) * (segment_ids_BL > 0)
    batch = {'input_ids': input_ids_BL, 'segment_ids': segment_ids_BL, 'positions': positions_BL,
             'token_type_ids': token_type_BL, 'mlm_positions': mlm_positions_BP}
    for name, size in extra.items():
      values = np.array([row.get(name, 0) for row in per_row], np.int32)
      if bad := [v for v in values.tolist() if not 0 <= v < size]:
        raise ValueError(f'--feature {name}={bad[0]} is outside [0, {size})')
      batch[name] = np.where(segment_ids_BL > 0, values[:, None], 0).astype(np.int32)
    return batch, slots

  def logits(self, batch: dict) -> np.ndarray:
    """fp32 logits [B, P, V] at batch['mlm_positions']."""
    return np.asarray(self._logits(self._state, batch))

  def predict(self, texts: list[str], top_k: int = 5, features: dict[str, int] | None = None):
    """Per text, per [MASK]: a list of (token, probability), most likely first."""
    batch, slots = self.batch(texts, features)
    logits_BPV = self.logits(batch)
    probs_BPV = np.asarray(jax.nn.softmax(logits_BPV, axis=-1))
    out = []
    for r, s in enumerate(slots):
      per_mask = []
      for j in range(len(s)):
        top_K = np.argsort(-probs_BPV[r, j], kind='stable')[:top_k]
        per_mask.append([(self.token(i), float(probs_BPV[r, j, i])) for i in top_K])
      out.append(per_mask)
    return out

  def token(self, token_id) -> str:
    tok = self.tokenizer
    if tok.kind == 'wordpiece':
      return tok.pieces[int(token_id)]
    return tok.decode([token_id])


def parse_features(items: list[str]) -> dict[str, int]:
  out = {}
  for item in items:
    m = re.fullmatch(r'([\w.-]+)=(-?\d+)', item)
    if not m:
      raise ValueError(f'--feature {item!r}: expected name=id, e.g. tld=17')
    out[m.group(1)] = int(m.group(2))
  return out


def format_predictions(texts, results) -> str:
  lines = []
  for text, per_mask in zip(texts, results):
    lines.append(text)
    for j, preds in enumerate(per_mask):
      lines.append(f'  {MASK} #{j + 1}: ' + '  '.join(f'{t!r} {p:.3f}' for t, p in preds))
  return '\n'.join(lines)


def define_flags():
  """Only when run as a program: importing this module must not claim global flag names."""
  rundir.define_path_flags()
  flags.DEFINE_integer('top_k', 5, 'Predictions shown per [MASK].')
  flags.DEFINE_multi_string('feature', [], 'Extra embedding input, name=id (default 0).')


def main(argv):
  texts, f = argv[1:], flags.FLAGS
  if not texts:
    raise app.UsageError(f'give at least one text with {MASK}, e.g. "the [MASK] is here ."')
  if not f['verbosity'].present:  # orbax logs every read at INFO and a read-only notice at WARNING
    logging.set_verbosity(logging.ERROR)
  try:
    predictor = Predictor(rundir.path_from_flags(), f.step)
    results = predictor.predict(texts, f.top_k, parse_features(f.feature))
  except (ValueError, CheckpointError, DataError) as e:
    errors.fail(e)
  print(f'step {predictor.step}')
  print(format_predictions(texts, results))


if __name__ == '__main__':
  define_flags()
  app.run(main)
