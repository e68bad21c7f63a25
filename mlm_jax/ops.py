"""Backend-specific kernels of the model: same values as the plain jax.numpy/nnx forms, faster
where XLA's default lowering is slow (mostly XLA:CPU), or a fused kernel where one exists.

- `dropout`: keep-masks from 16-bit threefry lanes, independent of sharding;
- `dense`: an nnx.Linear whose backward pass suits XLA:CPU's matmuls;
- `add_vocab_bias`: the MLM head's bias, its gradient as a matvec;
- `attention`: jax.nn.dot_product_attention, cuDNN on GPU for 16-bit inputs, else XLA.

Shape letters: B batch, L sequence, P prediction slots, N heads, D head dim, V vocabulary;
M and K, N of a matmul [M x K] @ [K x N].
"""
import jax
import jax.numpy as jnp
from flax import nnx
from jax.extend.random import threefry2x32_p


def _backend() -> str:
  return jax.default_backend()


def _keep_mask(key, shape, rate):
  """Boolean [*shape] keep-mask from threefry; drop probability round(rate * 65536) / 65536.

  jax.random.bernoulli spends one threefry2x32 block (64 bits) per element and keeps 32 of them;
  here each block gives four 16-bit lanes, so a quarter of the blocks: dropout's random bits were
  ~8% of a BERT-small CPU step. Counters are the element's global coordinates (batch row, offset
  in the row), so the mask does not depend on how the array is sharded, like jax.random's.
  """
  *lead, n = shape
  counter_shape = (*lead, -(-n // 4))
  # Two 32-bit counter words: the batch row, and the offset within the row (row-major).
  row = jax.lax.broadcasted_iota(jnp.uint32, counter_shape, 0) if lead else jnp.zeros((), jnp.uint32)
  offset, stride = jnp.zeros(counter_shape, jnp.uint32), 1
  for d in reversed(range(1 if lead else 0, len(counter_shape))):
    offset = offset + jax.lax.broadcasted_iota(jnp.uint32, counter_shape, d) * jnp.uint32(stride)
    stride *= counter_shape[d]
  k = jax.random.key_data(key)
  hi, lo = threefry2x32_p.bind(k[0], k[1], jnp.broadcast_to(row, counter_shape), offset)
  threshold = jnp.uint32(round(rate * 65536))
  lanes = (hi >> 16, hi & 0xFFFF, lo >> 16, lo & 0xFFFF)
  return jnp.concatenate([lane >= threshold for lane in lanes], axis=-1)[..., :n]


def dropout(x, rate, key):
  """Inverted dropout of `x`; `key=None` or `rate=0` is the identity (eval)."""
  if key is None or rate == 0.0:
    return x
  if jax.random.key_data(key).shape != (2,):  # not a threefry key: jax.random's own way
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
  keep_prob = 1.0 - round(rate * 65536) / 65536
  return jnp.where(_keep_mask(key, x.shape, rate), x * (1.0 / keep_prob), 0).astype(x.dtype)


def _sum_rows(g_MN):
  """Σ over rows as a [1 x M] @ [M x N] matvec: XLA:CPU's column reduction is far slower (56 ms vs
  2 ms for the head bias gradient of a 2.5 s BERT-small step). Same sum up to float order."""
  return jnp.ones((g_MN.shape[0],), g_MN.dtype) @ g_MN


@jax.custom_vjp
def _cpu_dense(x_MK, kernel_KN, bias_N):
  return x_MK @ kernel_KN + bias_N


def _cpu_dense_fwd(x_MK, kernel_KN, bias_N):
  return _cpu_dense(x_MK, kernel_KN, bias_N), (x_MK, kernel_KN)


def _cpu_dense_bwd(residuals, dy_MN):
  x_MK, kernel_KN = residuals
  # XLA:CPU's matmul is ~20% slower when it reads the left operand transposed (x.T @ dy, the
  # weight gradient); materializing x.T first (a copy of the activations, small next to the
  # matmul) and stopping XLA from folding it back in is faster.
  x_KM = jax.lax.optimization_barrier(x_MK.T)
  return dy_MN @ kernel_KN.T, x_KM @ dy_MN, _sum_rows(dy_MN)


_cpu_dense.defvjp(_cpu_dense_fwd, _cpu_dense_bwd)


def dense(layer: nnx.Linear, x):
  """`layer(x)`; on CPU through `_cpu_dense`, whose backward pass suits XLA:CPU's matmuls. Same
  parameters (the layer's own kernel and bias) and the same values up to float summation order."""
  if _backend() != 'cpu' or layer.bias is None:
    return layer(x)
  dtype = layer.dtype or x.dtype
  kernel, bias = layer.kernel[...].astype(dtype), layer.bias[...].astype(dtype)
  y = _cpu_dense(x.astype(dtype).reshape(-1, x.shape[-1]), kernel, bias)
  return y.reshape(*x.shape[:-1], kernel.shape[-1])


@jax.custom_vjp
def add_vocab_bias(logits_BPV, bias_V):
  """`logits_BPV + bias_V`; the bias gradient (Σ over B and P) as a `_sum_rows` matvec."""
  return logits_BPV + bias_V


def _add_vocab_bias_fwd(logits_BPV, bias_V):
  return logits_BPV + bias_V, None


def _add_vocab_bias_bwd(_, g_BPV):
  return g_BPV, _sum_rows(g_BPV.reshape(-1, g_BPV.shape[-1]))


add_vocab_bias.defvjp(_add_vocab_bias_fwd, _add_vocab_bias_bwd)


def attention(q_BLND, k_BLND, v_BLND, mask_B1LL, impl: str):
  """jax.nn.dot_product_attention. 'auto': cuDNN's fused (flash) kernel on GPU for 16-bit inputs,
  which is what it supports (the segment mask goes in as its additive bias, broadcast over heads);
  XLA anywhere else, and also on GPU when cuDNN refuses the shapes at trace time (no cuDNN, an
  unsupported head size or GPU), so 'auto' never fails where 'xla' would work."""
  call = lambda implementation: jax.nn.dot_product_attention(
      q_BLND, k_BLND, v_BLND, mask=mask_B1LL, implementation=implementation)
  if impl != 'auto':
    return call(impl)
  if _backend() == 'gpu' and q_BLND.dtype in (jnp.bfloat16, jnp.float16):
    try:
      return call('cudnn')
    except (ValueError, NotImplementedError, RuntimeError):
      pass
  return call('xla')
