"""Counter-based randomness: every random number is a pure hash of (seed, stream, epoch, record, i).

A numpy Generator per record costs ~10 us to seed, more than the whole per-record budget of the
char-level pipeline, so masks and window offsets use splitmix64 over explicit counters instead:
vectorized over a whole chunk, and the same numbers whatever the chunking, worker count or restart.
"""
import numpy as np

_M64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15

# Purposes: independent streams drawn for the same token.
SELECT, CATEGORY, REPLACE, WINDOW, ROUNDING = range(5)
# Streams: train and eval never share masks.
TRAIN, EVAL = 0, 1


def _mix_int(x: int) -> int:
  x &= _M64
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
  return x ^ (x >> 31)


@np.errstate(over='ignore')
def mix(x: np.ndarray) -> np.ndarray:
  """splitmix64 finalizer on a uint64 array (wrap-around multiplication is intended)."""
  x = np.asarray(x, np.uint64)
  x = x ^ (x >> np.uint64(30))
  x = x * np.uint64(0xBF58476D1CE4E5B9)
  x = x ^ (x >> np.uint64(27))
  x = x * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def record_keys(seed: int, stream: int, epoch_N, record_N) -> np.ndarray:
  """One 64-bit key per (seed, stream, epoch, record); everything per token derives from it."""
  base = _mix_int(_mix_int(seed + _GAMMA) ^ (stream * _GAMMA))
  epoch_N = np.asarray(epoch_N, np.uint64)
  record_N = np.asarray(record_N, np.uint64)
  with np.errstate(over='ignore'):
    h = mix(np.uint64(base) ^ (epoch_N * np.uint64(_GAMMA)))
    return mix(h ^ mix(record_N + np.uint64(1)))


def uniform(keys_N: np.ndarray, counter_N, purpose: int) -> np.ndarray:
  """Uniform floats in [0, 1): element i depends only on (keys_N[i], counter_N[i], purpose)."""
  with np.errstate(over='ignore'):
    c = np.asarray(counter_N, np.uint64) * np.uint64(8) + np.uint64(purpose + 1)
    bits = mix(keys_N + c * np.uint64(_GAMMA))
  return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def fold32(keys_N: np.ndarray) -> np.ndarray:
  """64-bit keys folded to 32 bits, for the per-token hot path (uniform32)."""
  return (keys_N ^ (keys_N >> np.uint64(32))).astype(np.uint32)


@np.errstate(over='ignore')
def uniform32(keys32_N: np.ndarray, counter_N: np.ndarray, purpose: int) -> np.ndarray:
  """Cheaper uniforms (float32, 24 bits) for every token of a chunk: murmur3's 32-bit finalizer
  over (32-bit record key, counter, purpose). Half the memory traffic of the 64-bit path."""
  x = counter_N.astype(np.uint32) * np.uint32(0x9E3779B9)
  x += keys32_N
  x += np.uint32((purpose * 0x85EBCA77 + 0x27D4EB2F) & 0xFFFFFFFF)
  x ^= x >> np.uint32(16)
  x *= np.uint32(0x85EBCA6B)
  x ^= x >> np.uint32(13)
  x *= np.uint32(0xC2B2AE35)
  x ^= x >> np.uint32(16)
  x >>= np.uint32(8)
  return x.astype(np.float32) * np.float32(1.0 / (1 << 24))
