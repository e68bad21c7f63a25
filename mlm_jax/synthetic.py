"""Random batches in the model's layout, for tests and benchmarks (no tokenizer, no files)."""
import numpy as np


def random_batch(seed: int, batch_size: int, max_len: int, max_predictions: int, vocab_size: int,
                 extra_embeddings: dict | None = None, mask_rate: float = 0.15,
                 num_special: int = 5) -> dict[str, np.ndarray]:
  """Full-length rows of random tokens with round(mask_rate * L) masked slots each."""
  rng = np.random.default_rng(seed)
  b, l, p = batch_size, max_len, max_predictions
  ids_BL = rng.integers(num_special, vocab_size, (b, l), dtype=np.int32)
  n_masked = min(p, max(1, round(mask_rate * (l - 2))))
  positions_BP = np.zeros((b, p), np.int32)
  targets_BP = np.zeros((b, p), np.int32)
  weights_BP = np.zeros((b, p), np.float32)
  for r in range(b):
    pos = np.sort(rng.choice(np.arange(1, l - 1), n_masked, replace=False))
    positions_BP[r, :n_masked] = pos
    targets_BP[r, :n_masked] = ids_BL[r, pos]
    weights_BP[r, :n_masked] = 1.0
    ids_BL[r, pos] = 4  # a [MASK]-like id
  batch = {
      'input_ids': ids_BL,
      'segment_ids': np.ones((b, l), np.int32),
      'positions': np.tile(np.arange(l, dtype=np.int32), (b, 1)),
      'token_type_ids': np.zeros((b, l), np.int32),
      'mlm_positions': positions_BP,
      'mlm_targets': targets_BP,
      'mlm_weights': weights_BP,
  }
  for name, size in (extra_embeddings or {}).items():
    batch[name] = rng.integers(0, size, (b, l), dtype=np.int32)
  return batch
