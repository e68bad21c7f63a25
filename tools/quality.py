"""A trained run against simple baselines, on the same fixed-mask eval batches.

  python tools/quality.py --workdir=DIR [--eval_files=GLOB] [--max_batches=N]

Baselines (counted on the run's training split, add-one smoothed):
- unigram: predicts every masked token from the training token frequencies;
- bigram: predicts a masked token from the token to its left as the model sees it (backs off to the
  unigram where that token is itself [MASK] or a special token).
Prints a table and a final line `RESULT model_loss=... unigram_loss=... bigram_loss=...`.
"""
import math

import ml_collections
import numpy as np
from absl import app, flags

from mlm_jax import data, evaluate, rundir

_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained run directory.')
_EVAL_FILES = flags.DEFINE_string('eval_files', None, 'Held-out files (default: the run\'s eval split).')
_MAX_BATCHES = flags.DEFINE_integer('max_batches', None, 'Eval batches at most.')
_MAX_TRAIN_BATCHES = flags.DEFINE_integer('max_train_batches', 2000,
                                          'Training batches to count the baselines on, at most.')


def original_ids(batch):
  """input_ids with the masked slots' targets put back: the text before masking."""
  ids = batch['input_ids'].copy()
  rows, slots = np.nonzero(batch['mlm_weights'] > 0)
  ids[rows, batch['mlm_positions'][rows, slots]] = batch['mlm_targets'][rows, slots]
  return ids


def count(config, tokenizer, max_batches):
  v = tokenizer.vocab_size
  unigram = np.ones(v)  # add-one smoothing
  bigram = np.ones((v, v), np.float32) if v <= 8192 else None
  batches = data.eval_batches(config, tokenizer, max_batches=max_batches, split_name='train')
  special = np.asarray(tokenizer.special_ids)
  for batch in batches:
    ids, seg = original_ids(batch), batch['segment_ids']
    real = (seg > 0) & ~np.isin(ids, special)
    unigram += np.bincount(ids[real], minlength=v)
    if bigram is not None:
      pair = real[:, 1:] & (seg[:, 1:] == seg[:, :-1])
      np.add.at(bigram, (ids[:, :-1][pair], ids[:, 1:][pair]), 1)
  return unigram / unigram.sum(), bigram


def score(config, tokenizer, unigram_V, bigram_VV, max_batches):
  special = set(int(s) for s in tokenizer.special_ids)
  log_uni = np.log(unigram_V)
  log_bi = None if bigram_VV is None else np.log(bigram_VV / bigram_VV.sum(1, keepdims=True))
  sums = {'unigram': [0.0, 0.0], 'bigram': [0.0, 0.0]}
  n = 0.0
  best_uni = int(np.argmax(log_uni))
  for batch in data.eval_batches(config, tokenizer, max_batches=max_batches):
    rows, slots = np.nonzero(batch['mlm_weights'] > 0)
    pos, target = batch['mlm_positions'][rows, slots], batch['mlm_targets'][rows, slots]
    left = batch['input_ids'][rows, np.maximum(pos - 1, 0)]
    n += len(target)
    sums['unigram'][0] -= log_uni[target].sum()
    sums['unigram'][1] += (target == best_uni).sum()
    if log_bi is None:
      continue
    usable = ~np.isin(left, list(special))
    lp = np.where(usable, log_bi[left, target], log_uni[target])
    pred = np.where(usable, np.argmax(log_bi[left], axis=1), best_uni)
    sums['bigram'][0] -= lp.sum()
    sums['bigram'][1] += (pred == target).sum()
  return {k: (s[0] / n, s[1] / n) for k, s in sums.items() if k == 'unigram' or log_bi is not None}


def main(argv):
  del argv
  run = rundir.load(_WORKDIR.value)
  model = evaluate.evaluate(_WORKDIR.value, _EVAL_FILES.value, max_batches=_MAX_BATCHES.value,
                            run=run)
  config, tokenizer, step = ml_collections.ConfigDict(run.config), run.tokenizer, run.step
  if _EVAL_FILES.value:
    config.data.eval_files = _EVAL_FILES.value
  unigram, bigram = count(config, tokenizer, _MAX_TRAIN_BATCHES.value)
  base = score(config, tokenizer, unigram, bigram, _MAX_BATCHES.value)
  rows = [('model (step %d)' % step, model['loss'], model['accuracy'])]
  rows += [(name, loss, acc) for name, (loss, acc) in base.items()]
  print(f"{'predictor':<20} {'loss':>8} {'accuracy':>9} {'perplexity':>11}")
  for name, loss, acc in rows:
    print(f'{name:<20} {loss:8.4f} {acc:9.4f} {math.exp(loss):11.2f}')
  print('RESULT ' + ' '.join(f'{n.split()[0]}_loss={l:.4f} {n.split()[0]}_accuracy={a:.4f}'
                             for n, l, a in rows))


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
