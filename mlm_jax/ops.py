"""Backend-specific kernels of the model: same values as the plain jax.numpy/nnx forms, faster
where XLA's default lowering is slow (mostly XLA:CPU), or a fused kernel where one exists.

- `dropout`: keep-masks from 16-bit threefry lanes, independent of sharding;
- `dense`: an nnx.Linear whose backward pass suits XLA:CPU's matmuls;
- `tied_logits`: the MLM decoder tied to the word embeddings, fp32 logits;
- `add_vocab_bias`: the MLM head's bias, its gradient as a matvec;
- `attention`: jax.nn.dot_product_attention, cuDNN on GPU for 16-bit inputs, else XLA; explicit
  probabilities with attention dropout.

bfloat16 on CPU: XLA:CPU runs a matmul on bf16 operands (YNNPACK, fp32 accumulation, ~2x the fp32
rate with AVX512-BF16) only when its result is fp32; a bf16 x bf16 -> bf16 dot, or one with an fp32
operand (autodiff's cotangents from the fp32 loss), it computes in fp32 after converting. So with
bf16 compute on CPU every matmul here, forward and backward, is written as bf16 x bf16 -> fp32
(`preferred_element_type`) with its own backward pass that casts the cotangent to bf16 first, as
GPUs and TPUs compute it. fp32 compute, and every other backend, take the plain forms unchanged.

Shape letters: B batch, L sequence, P prediction slots, N heads, D head dim, V vocabulary;
M and K, N of a matmul [M x K] @ [K x N].
"""
import functools

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


def _cpu_bf16(dtype) -> bool:
  """Whether matmuls in `dtype` take the bf16 x bf16 -> fp32 forms below (see the docstring)."""
  return _backend() == 'cpu' and jnp.dtype(dtype) == jnp.bfloat16


def _matmul_f32(a, b, contract):
  """a @ b over a's dim contract[0] and b's contract[1], accumulated and returned in fp32."""
  dims = (((contract[0],), (contract[1],)), ((), ()))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _transposed(x):
  """x [..., K] as a row-major [K, prod(...)] copy (x.T for a matrix). XLA:CPU folds a plain
  transpose into the dot as a column-major operand, which its bf16 matmul does not take (it converts
  both operands to fp32 instead); through a unit axis the transpose stays a copy of its own. From
  x's own shape, not a flattened [M, K] view: XLA:CPU transposes a flattened view ~20x slower."""
  return jnp.moveaxis(x[None], -1, 1).reshape(x.shape[-1], -1)


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


def _sum_rows_f32(g_MN):
  """`_sum_rows` of a bf16 array, accumulated in fp32."""
  return _matmul_f32(jnp.ones((g_MN.shape[0],), g_MN.dtype), g_MN, (0, 0))


@jax.custom_vjp
def _cpu_dense_bf16(x, kernel_KN, bias_N):
  """bf16 x [..., K] @ kernel + bias in fp32, rounded to bf16; kernel and bias in their own
  (parameter) dtype, so their gradients come out of the fp32 accumulators unrounded."""
  y_MN = _matmul_f32(x.reshape(-1, x.shape[-1]), kernel_KN.astype(x.dtype), (1, 0))
  if bias_N is not None:
    y_MN = y_MN + bias_N.astype(jnp.float32)
  return y_MN.astype(x.dtype).reshape(*x.shape[:-1], -1)


def _cpu_dense_bf16_fwd(x, kernel_KN, bias_N):
  return _cpu_dense_bf16(x, kernel_KN, bias_N), (x, kernel_KN, bias_N)


def _cpu_dense_bf16_bwd(residuals, dy):
  x, kernel_KN, bias_N = residuals
  dy_MN = dy.reshape(-1, dy.shape[-1])
  dx_MK = _matmul_f32(dy_MN, kernel_KN.astype(dy.dtype), (1, 1)).astype(x.dtype)
  dkernel_KN = _matmul_f32(_transposed(x), dy_MN, (1, 0)).astype(kernel_KN.dtype)
  dbias_N = None if bias_N is None else _sum_rows_f32(dy_MN).astype(bias_N.dtype)
  return dx_MK.reshape(x.shape), dkernel_KN, dbias_N


_cpu_dense_bf16.defvjp(_cpu_dense_bf16_fwd, _cpu_dense_bf16_bwd)


def dense(layer: nnx.Linear, x):
  """`layer(x)`; on CPU through `_cpu_dense` (or `_cpu_dense_bf16`), whose backward pass suits
  XLA:CPU's matmuls. Same parameters (the layer's own kernel and bias) and the same values up to
  float summation order (and, in bf16, the rounding of the result)."""
  dtype = layer.dtype or x.dtype
  if _cpu_bf16(dtype):
    bias = None if layer.bias is None else layer.bias[...]
    return _cpu_dense_bf16(x.astype(dtype), layer.kernel[...], bias)
  if _backend() != 'cpu' or layer.bias is None:
    return layer(x)
  kernel, bias = layer.kernel[...].astype(dtype), layer.bias[...].astype(dtype)
  y = _cpu_dense(x.astype(dtype).reshape(-1, x.shape[-1]), kernel, bias)
  return y.reshape(*x.shape[:-1], kernel.shape[-1])


@jax.custom_vjp
def _cpu_tied_logits_bf16(x_BPH, embedding_VH):
  """fp32 logits x @ embedding.T of bf16 x, the embedding in its parameter dtype."""
  b, p, h = x_BPH.shape
  return _matmul_f32(x_BPH.reshape(b * p, h), embedding_VH.astype(x_BPH.dtype),
                     (1, 1)).reshape(b, p, -1)


def _cpu_tied_logits_bf16_fwd(x_BPH, embedding_VH):
  return _cpu_tied_logits_bf16(x_BPH, embedding_VH), (x_BPH, embedding_VH)


def _cpu_tied_logits_bf16_bwd(residuals, g_BPV):
  x_BPH, embedding_VH = residuals
  b, p, h = x_BPH.shape
  g_BPV = g_BPV.astype(x_BPH.dtype)  # the loss's fp32 cotangent, rounded as GPUs/TPUs do
  g_MV, x_MH = g_BPV.reshape(b * p, -1), x_BPH.reshape(b * p, h)
  dx_MH = _matmul_f32(g_MV, embedding_VH.astype(x_BPH.dtype), (1, 0)).astype(x_BPH.dtype)
  # Transposing g ([B, P, V], bf16) costs less than transposing the [H x V] fp32 result would.
  dembedding_VH = _matmul_f32(_transposed(g_BPV), x_MH, (1, 0)).astype(embedding_VH.dtype)
  return dx_MH.reshape(b, p, h), dembedding_VH


_cpu_tied_logits_bf16.defvjp(_cpu_tied_logits_bf16_fwd, _cpu_tied_logits_bf16_bwd)


def tied_logits(word: nnx.Embed, x_BPH):
  """fp32 logits `word.attend(x)` [B, P, V] of the decoder tied to the word embeddings."""
  dtype = word.dtype or x_BPH.dtype
  if not _cpu_bf16(dtype):
    return word.attend(x_BPH).astype(jnp.float32)
  return _cpu_tied_logits_bf16(x_BPH.astype(dtype), word.embedding[...])


@jax.custom_vjp
def add_vocab_bias(logits_BPV, bias_V):
  """`logits_BPV + bias_V`; the bias gradient (Σ over B and P) as a `_sum_rows` matvec."""
  return logits_BPV + bias_V


def _add_vocab_bias_fwd(logits_BPV, bias_V):
  return logits_BPV + bias_V, None


def _add_vocab_bias_bwd(_, g_BPV):
  return g_BPV, _sum_rows(g_BPV.reshape(-1, g_BPV.shape[-1]))


add_vocab_bias.defvjp(_add_vocab_bias_fwd, _add_vocab_bias_bwd)


def _einsum_f32(spec: str, a, b):
  """Two-operand einsum accumulated and returned in fp32. The operands go in the order that lists
  the first one's free indices before the second's in the output: XLA:CPU compiled
  'blnd,bnlm->bmnd' in bf16 to a dot it then could not run, 'bnlm,blnd->bmnd' it runs."""
  inputs, out = spec.split('->')
  sa, sb = inputs.split(',')
  first_free = lambda s, other: min((out.index(c) for c in s if c not in other), default=0)
  if first_free(sb, sa) < first_free(sa, sb):
    sa, sb, a, b = sb, sa, b, a
  return jnp.einsum(f'{sa},{sb}->{out}', a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _einsum_bf16(spec: str, a, b, out_dtype):
  """einsum of bf16 operands with fp32 accumulation, the result in `out_dtype`."""
  return _einsum_f32(spec, a, b).astype(out_dtype)


def _einsum_bf16_fwd(spec, a, b, out_dtype):
  return _einsum_bf16(spec, a, b, out_dtype), (a, b)


def _einsum_bf16_bwd(spec, out_dtype, residuals, g):
  del out_dtype
  a, b = residuals
  inputs, out = spec.split('->')
  sa, sb = inputs.split(',')
  g = g.astype(a.dtype)  # an fp32 cotangent (from the fp32 softmax) goes in as bf16
  return (_einsum_f32(f'{out},{sb}->{sa}', g, b).astype(a.dtype),
          _einsum_f32(f'{out},{sa}->{sb}', g, a).astype(b.dtype))


_einsum_bf16.defvjp(_einsum_bf16_fwd, _einsum_bf16_bwd)


def _explicit_attention(q_BLND, k_BLND, v_BLND, mask_B1LL, dropout_rate, dropout_key):
  """Softmax attention with the probabilities computed explicitly (and dropped out)."""
  d = q_BLND.shape[-1]
  if _cpu_bf16(q_BLND.dtype):  # fp32 scores and softmax, as jax.nn.dot_product_attention
    logits_BNLL = _einsum_bf16('blnd,bmnd->bnlm', q_BLND, k_BLND, jnp.float32) * (1 / d**0.5)
    logits_BNLL = jnp.where(mask_B1LL, logits_BNLL, jnp.finfo(jnp.float32).min)
    probs_BNLL = jax.nn.softmax(logits_BNLL, axis=-1).astype(q_BLND.dtype)
    probs_BNLL = dropout(probs_BNLL, dropout_rate, dropout_key)
    return _einsum_bf16('bnlm,bmnd->blnd', probs_BNLL, v_BLND, q_BLND.dtype)
  logits_BNLL = jnp.einsum('blnd,bmnd->bnlm', q_BLND, k_BLND) / jnp.sqrt(d).astype(q_BLND.dtype)
  logits_BNLL = jnp.where(mask_B1LL, logits_BNLL, jnp.finfo(logits_BNLL.dtype).min)
  probs_BNLL = jax.nn.softmax(logits_BNLL.astype(jnp.float32), axis=-1).astype(q_BLND.dtype)
  probs_BNLL = dropout(probs_BNLL, dropout_rate, dropout_key)
  return jnp.einsum('bnlm,bmnd->blnd', probs_BNLL, v_BLND)


def attention(q_BLND, k_BLND, v_BLND, mask_B1LL, impl: str, dropout_rate: float = 0.0,
              dropout_key=None):
  """jax.nn.dot_product_attention. 'auto': cuDNN's fused (flash) kernel on GPU for 16-bit inputs,
  which is what it supports (the segment mask goes in as its additive bias, broadcast over heads);
  XLA anywhere else, and also on GPU when cuDNN refuses the shapes at trace time (no cuDNN, an
  unsupported head size or GPU), so 'auto' never fails where 'xla' would work.

  With attention dropout (a rate and a key) the probabilities are computed explicitly: the fused
  kernels have none. So are they with 'auto' for bf16 on CPU: through jax.nn.dot_product_attention
  the backward pass would run its matmuls in fp32 (see the module docstring)."""
  if dropout_rate > 0.0 and dropout_key is not None:
    return _explicit_attention(q_BLND, k_BLND, v_BLND, mask_B1LL, dropout_rate, dropout_key)
  if impl == 'auto' and _cpu_bf16(q_BLND.dtype):
    return _explicit_attention(q_BLND, k_BLND, v_BLND, mask_B1LL, 0.0, None)
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
