"""The Hugging Face Flax reference (shared/bench/hf_flax_mlm.py) trained on real rows for tools/race.py.

Runs in the reference's interpreter (transformers<5 with Flax; shared/bench/README.md), never ours.
The reference's own `main()` runs unchanged: its model, optimizer, schedule, train step and masking.
Only its stand-ins are replaced: `raw_batch` serves the race's training rows (the text tokenized
with the race's WordPiece vocabulary and grouped into `seq`-token rows, as run_mlm_flax's
group_texts), shuffled per epoch, and `common.MASK` is that vocabulary's [MASK] id. Its jitted train
step is wrapped so that, every `--score_every_s` seconds of training, the clock pauses while
tools/race_score.py scores the current parameters on the held-out rows; at `--budget_s` it scores
once more and stops. Seconds count from `--t0` (the launch, in time.time()), minus scoring.

Output: one JSON line per score, {"t": seconds, "step": n, "loss": held-out loss}, to --out;
`--score_every_s 0` only measures the step time (calibration) and prints `STEP_S=...`.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

_TOOLS = os.path.dirname(os.path.abspath(__file__))


class _Stop(Exception):
  pass


class _Race:
  """Wraps the reference's jitted train step: a clock that pauses while scoring, and the stop."""

  def __init__(self, args, jax, heldout, race_score):
    self.args, self.jax, self.heldout, self.race_score = args, jax, heldout, race_score
    self.paused, self.steps, self.step_times = 0.0, 0, []
    self.next_score = args.score_every_s
    self.out = open(args.out, 'w') if args.out else None
    self.forward = None

  def elapsed(self) -> float:
    return time.time() - self.args.t0 - self.paused

  def score(self, state) -> float:
    jax = self.jax
    if self.forward is None:
      apply_fn = state.apply_fn

      @jax.jit
      def forward(params, ids_BL, attention_BL, positions_BP):
        logits_BLV = apply_fn(input_ids=ids_BL, attention_mask=attention_BL,
                              token_type_ids=jax.numpy.zeros_like(ids_BL), params=params,
                              train=False)[0]
        return jax.numpy.take_along_axis(logits_BLV, positions_BP[..., None], axis=1)
      self.forward = forward
    return self.race_score.score(lambda i, a, p: self.forward(state.params, i, a, p), self.heldout)

  def wrap(self, jitted):
    def step(state, batch, rng):
      t0 = time.perf_counter()
      state, metrics, rng = jitted(state, batch, rng)
      self.jax.block_until_ready((state, metrics))
      self.step_times.append(time.perf_counter() - t0)
      self.steps += 1
      now = self.elapsed()
      last = now >= self.args.budget_s or self.steps >= self.args.steps
      if self.args.score_every_s and (now >= self.next_score or last):
        tic = time.time()
        loss = self.score(state)
        self.paused += time.time() - tic
        record = {'t': round(now, 2), 'step': self.steps, 'loss': loss}
        print(json.dumps(record), flush=True)
        self.out.write(json.dumps(record) + '\n')
        self.out.flush()
        while self.next_score <= now:
          self.next_score += self.args.score_every_s
      if last:
        raise _Stop()
      return state, metrics, rng
    return step


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--reference_dir', required=True, help='folder with hf_flax_mlm.py and common.py')
  p.add_argument('--rows', required=True, help='.npy [N, seq] int32 training rows')
  p.add_argument('--heldout', required=True, help='.npz written by race_score.Heldout.save')
  p.add_argument('--t0', type=float, required=True, help='launch time (time.time())')
  p.add_argument('--budget_s', type=float, required=True)
  p.add_argument('--score_every_s', type=float, default=0.0)
  p.add_argument('--out', default='')
  p.add_argument('--steps', type=int, required=True, help="the reference schedule's length")
  p.add_argument('--warmup_steps', type=int, required=True)
  p.add_argument('--lr', type=float, default=3e-4)
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--model', default='3,192,4,768', help='layers,hidden,heads,intermediate')
  p.add_argument('--vocab', type=int, required=True)
  args = p.parse_args()

  sys.path[:0] = [args.reference_dir, _TOOLS]
  import common  # the reference's  # pylint: disable=import-outside-toplevel
  import hf_flax_mlm  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import race_score  # pylint: disable=import-outside-toplevel

  rows_NL = np.load(args.rows)
  seq = rows_NL.shape[1]
  heldout = race_score.Heldout.load(args.heldout)
  common.MASK = race_score.MASK  # the reference masks with common.MASK: our vocabulary's id
  order = np.random.default_rng(1)
  cursor = {'perm': order.permutation(len(rows_NL)), 'i': 0}

  def raw_batch(rng, batch, seq_len, vocab):  # the reference's stand-in, now real rows
    del rng, seq_len, vocab
    picked = []
    while len(picked) < batch:
      if cursor['i'] == len(rows_NL):
        cursor['perm'], cursor['i'] = order.permutation(len(rows_NL)), 0
      picked.append(cursor['perm'][cursor['i']])
      cursor['i'] += 1
    ids = rows_NL[np.asarray(picked)].copy()
    special = (ids == race_score.CLS) | (ids == race_score.SEP) | (ids == race_score.PAD)
    return ids, special

  race = _Race(args, jax, heldout, race_score)

  class _Jax:  # the reference module's `jax`, with its jit wrapped
    def __getattr__(self, name):
      return getattr(jax, name)

    def jit(self, fun, **kw):
      return race.wrap(jax.jit(fun, **kw))

  layers, hidden, heads, intermediate = (int(x) for x in args.model.split(','))
  hf_flax_mlm.raw_batch, hf_flax_mlm.jax = raw_batch, _Jax()
  hf_flax_mlm.report = lambda *a, **k: None
  sys.argv = ['hf_flax_mlm.py', '--layers', str(layers), '--hidden', str(hidden), '--heads',
              str(heads), '--intermediate', str(intermediate), '--vocab', str(args.vocab), '--seq',
              str(seq), '--batch', str(args.batch), '--steps', str(args.steps), '--warmup-steps',
              str(args.warmup_steps), '--lr', str(args.lr)]
  try:
    hf_flax_mlm.main()
  except _Stop:
    pass
  steady = race.step_times[3:] or race.step_times
  print(f'STEP_S={statistics.median(steady):.4f} steps={race.steps} t={race.elapsed():.1f}')


if __name__ == '__main__':
  main()
