"""The one scorer of tools/race.py: held-out rows with fixed masks, and the MLM loss of any model on them.

numpy only, so the same file runs in our interpreter and in the reference's (shared/bench needs
`transformers<5`, a separate venv). Every contender is scored by `score()` on the same `Heldout`;
only the forward pass differs, passed in as `logits_fn`.

Held-out rows: one text line (a WikiText paragraph) per row, `[CLS] tokens [SEP]` cut to `seq` and
padded with [PAD]. Masks: 15% of the real non-special tokens of each row, chosen with a fixed seed
(at least one per row), 80% [MASK] / 10% a random token / 10% kept, as BERT. The loss is the mean
cross-entropy over all chosen tokens of all rows, in float64.
"""
import dataclasses

import numpy as np

PAD, CLS, SEP, MASK, N_SPECIAL = 0, 2, 3, 4, 5  # tools/train_tokenizer.py's special-token ids


@dataclasses.dataclass(frozen=True)
class Heldout:
  input_ids_NL: np.ndarray  # masked inputs, int32
  attention_NL: np.ndarray  # 1 = real token, 0 = padding
  positions_NP: np.ndarray  # where the chosen tokens are (padded with 0)
  labels_NP: np.ndarray  # their original ids
  weights_NP: np.ndarray  # 1.0 for a real prediction slot, 0.0 for padding

  def save(self, path):
    np.savez(path, **dataclasses.asdict(self))

  @classmethod
  def load(cls, path) -> 'Heldout':
    with np.load(path) as f:
      return cls(**{k: f[k] for k in f.files})


def rows_per_line(token_ids_per_line, seq: int, min_tokens: int = 8):
  """[CLS] ids [SEP] per line, cut to seq, [PAD]-padded: (ids [N, seq], attention [N, seq])."""
  rows = [[CLS, *ids[:seq - 2], SEP] for ids in token_ids_per_line if len(ids) >= min_tokens]
  ids_NL = np.full((len(rows), seq), PAD, np.int32)
  for i, row in enumerate(rows):
    ids_NL[i, :len(row)] = row
  return ids_NL, (ids_NL != PAD).astype(np.int32)


def make_heldout(ids_NL, attention_NL, vocab_size: int, seed: int = 0, rate: float = 0.15) -> Heldout:
  """Fixed masks over held-out rows (same seed, same rows -> the same masks, bit for bit)."""
  rng = np.random.default_rng(seed)
  n, seq = ids_NL.shape
  p = max(1, int(np.ceil(rate * seq)))
  inputs, positions = ids_NL.copy(), np.zeros((n, p), np.int32)
  labels, weights = np.zeros((n, p), np.int32), np.zeros((n, p), np.float32)
  for i in range(n):
    candidates = np.flatnonzero((ids_NL[i] >= N_SPECIAL) & (attention_NL[i] > 0))
    k = min(p, max(1, int(round(rate * len(candidates)))))
    chosen = np.sort(rng.choice(candidates, size=k, replace=False))
    positions[i, :k], labels[i, :k], weights[i, :k] = chosen, ids_NL[i, chosen], 1.0
    action = rng.random(k)
    inputs[i, chosen[action < 0.8]] = MASK
    swap = chosen[(action >= 0.8) & (action < 0.9)]
    inputs[i, swap] = rng.integers(N_SPECIAL, vocab_size, size=len(swap))
  return Heldout(inputs, attention_NL, positions, labels, weights)


def score(logits_fn, heldout: Heldout, batch: int = 64) -> float:
  """Mean cross-entropy at the chosen tokens. `logits_fn(input_ids_BL, attention_BL, positions_BP)`
  returns the logits at `positions_BP`, [B, P, V] (any float dtype)."""
  total, count = 0.0, 0.0
  h = heldout
  for s in range(0, len(h.input_ids_NL), batch):
    sl = slice(s, s + batch)
    logits_BPV = np.asarray(logits_fn(h.input_ids_NL[sl], h.attention_NL[sl], h.positions_NP[sl]),
                            np.float64)
    shifted = logits_BPV - logits_BPV.max(-1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(-1))
    picked = np.take_along_axis(shifted, h.labels_NP[sl][..., None], -1)[..., 0]
    total += float(((log_z - picked) * h.weights_NP[sl]).sum())
    count += float(h.weights_NP[sl].sum())
  return total / count
