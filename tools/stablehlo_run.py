"""Runs an mlm_jax StableHLO export (tools/export_hf.py --format=stablehlo) with jax and numpy only.

tools/export_hf.py copies this file into the export directory; it imports nothing of mlm_jax or
flax. Filling masks in texts also needs the export's mlm_inputs.py (and `tokenizers`;
`publicsuffixlist` for a domain model) to turn texts into token ids:

  python stablehlo_run.py EXPORT_DIR 'exam[MASK]le.com' ...       # top 5 per [MASK]
  python stablehlo_run.py EXPORT_DIR --inputs batch.npz --out logits.npy

batch.npz holds int [B, L] arrays input_ids, attention_mask and token_type_ids (as mlm_inputs.py
builds them for transformers); logits.npy gets float32 [B, L, V]. As a library:

  logits_fn = load(EXPORT_DIR)
  logits_BLV = logits_fn(input_ids=..., attention_mask=..., token_type_ids=...)
"""
import argparse
import os
import sys

import jax
import numpy as np

EXPORT_FILE, PARAMS_FILE = 'model.jax_export', 'params.npz'
INPUTS = ('input_ids', 'attention_mask', 'token_type_ids')


def load(export_dir: str):
  """The export's forward pass: (input_ids, attention_mask, token_type_ids) -> logits [B, L, V]."""
  with open(os.path.join(export_dir, EXPORT_FILE), 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  with np.load(os.path.join(export_dir, PARAMS_FILE)) as z:
    params = jax.device_put({k: z[k] for k in z.files})

  def logits(input_ids, attention_mask, token_type_ids):
    arrays = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
    return np.asarray(exported.call(params, {k: np.asarray(v, np.int32) for k, v in arrays.items()}))

  return logits


def fill_masks(export_dir: str, texts: list[str], top_k: int = 5) -> list[list[list[tuple]]]:
  """Per text, per [MASK]: [(token, probability), ...], most likely first."""
  sys.path.insert(0, export_dir)
  import mlm_inputs  # pylint: disable=import-outside-toplevel,import-error
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
  spec = mlm_inputs.load_spec(export_dir)
  batch = mlm_inputs.model_inputs(texts, export_dir, spec=spec)
  logits_BLV = load(export_dir)(**{k: batch[k] for k in INPUTS})
  probs_BLV = np.exp(logits_BLV - logits_BLV.max(-1, keepdims=True))
  probs_BLV /= probs_BLV.sum(-1, keepdims=True)
  names = Tokenizer.from_file(os.path.join(export_dir, mlm_inputs.TOKENIZER_FILE))
  out = []
  for r in range(len(texts)):
    per_mask = []
    for j in np.flatnonzero(batch['input_ids'][r] == spec['mask_id']).tolist():
      top = np.argsort(-probs_BLV[r, j], kind='stable')[:top_k]
      per_mask.append([(names.id_to_token(int(i)), float(probs_BLV[r, j, i])) for i in top])
    out.append(per_mask)
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('export_dir')
  parser.add_argument('texts', nargs='*', help='texts with [MASK] (domain names for a domain model)')
  parser.add_argument('--inputs', help='.npz of input_ids, attention_mask, token_type_ids')
  parser.add_argument('--out', help='with --inputs: where to write the logits (.npy)')
  parser.add_argument('--top_k', type=int, default=5)
  args = parser.parse_args(argv)
  if bool(args.texts) == bool(args.inputs):
    parser.error('give texts, or --inputs FILE.npz --out FILE.npy')
  if args.inputs:
    if not args.out:
      parser.error('--inputs needs --out')
    with np.load(args.inputs) as z:
      np.save(args.out, load(args.export_dir)(**{k: z[k] for k in INPUTS}))
    return 0
  for text, per_mask in zip(args.texts, fill_masks(args.export_dir, args.texts, args.top_k)):
    print(text)
    for j, preds in enumerate(per_mask):
      print(f'  [MASK] #{j + 1}: ' + '  '.join(f'{t!r} {p:.3f}' for t, p in preds))
  return 0


if __name__ == '__main__':
  sys.exit(main())
