"""BERT for masked-language modelling in Flax NNX.

The encoder blocks are always created stacked (one leading `layers` axis on every block parameter),
so `scan_layers` only changes how they are applied (lax.scan or an unrolled loop) and never the
parameters or the numbers. The MLM head runs on the P prediction slots only, not on all L positions.

Shape letters: B batch, L sequence, P prediction slots, H hidden, N heads, D head dim, F feed-forward,
V vocabulary.
"""
import dataclasses
import re
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.extend.random import threefry2x32_p


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_len: int
  type_vocab_size: int = 2
  extra_embeddings: tuple[tuple[str, int], ...] = ()
  dropout: float = 0.1
  attention_dropout: float = 0.0
  layer_norm: str = 'post'
  layer_norm_eps: float = 1e-12
  init_std: float = 0.02
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  remat_policy: str = 'none'
  scan_layers: bool = False
  attention_impl: str = 'auto'

  @classmethod
  def from_config(cls, model_config, dtype: str) -> 'BertConfig':
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in model_config.items() if k in fields}
    kw['extra_embeddings'] = tuple(sorted(dict(model_config.extra_embeddings).items()))
    kw['dtype'] = dtype
    return cls(**kw)


def _init(cfg):
  return nnx.initializers.truncated_normal(stddev=cfg.init_std)


def _keep_mask(key, shape, rate):
  """Boolean [*shape] keep-mask with P(drop) = round(rate * 65536) / 65536, from threefry.

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


def _dropout(x, rate, key):
  if key is None or rate == 0.0:
    return x
  if jax.random.key_data(key).shape != (2,):  # not a threefry key: jax.random's own way
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
  keep_prob = 1.0 - round(rate * 65536) / 65536
  return jnp.where(_keep_mask(key, x.shape, rate), x * (1.0 / keep_prob), 0).astype(x.dtype)


class Embeddings(nnx.Module):
  """Sum of word, position, token-type and extra categorical embeddings, then LayerNorm."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    kw = dict(embedding_init=_init(cfg), dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.word = nnx.Embed(cfg.vocab_size, cfg.hidden_size, **kw)
    self.position = nnx.Embed(cfg.max_len, cfg.hidden_size, **kw)
    self.token_type = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size, **kw)
    self.extra = nnx.Dict({name: nnx.Embed(size, cfg.hidden_size, **kw)
                           for name, size in cfg.extra_embeddings})
    self.norm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype, rngs=rngs)
    self.pre_ln = cfg.layer_norm == 'pre'
    self.dropout = cfg.dropout

  def __call__(self, batch, dropout_key):
    x_BLH = (self.word(batch['input_ids']) + self.position(batch['positions'])
             + self.token_type(batch['token_type_ids']))
    for name, embed in self.extra.items():
      x_BLH = x_BLH + embed(batch[name])
    if not self.pre_ln:  # pre-LN normalizes at the input of each block instead
      x_BLH = self.norm(x_BLH)
    return _dropout(x_BLH, self.dropout, dropout_key)


def _backend() -> str:
  return jax.default_backend()


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


def _fused_attention(q_BLND, k_BLND, v_BLND, mask_B1LL, impl: str):
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


class EncoderBlock(nnx.Module):
  """Self-attention and feed-forward, each with a residual connection and LayerNorm."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    kw = dict(kernel_init=_init(cfg), dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    ln = dict(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    h = cfg.hidden_size
    self.qkv = nnx.Linear(h, 3 * h, **kw)  # fused: one matmul instead of three
    self.attn_out = nnx.Linear(h, h, **kw)
    self.attn_norm = nnx.LayerNorm(h, **ln)
    self.ff_in = nnx.Linear(h, cfg.intermediate_size, **kw)
    self.ff_out = nnx.Linear(cfg.intermediate_size, h, **kw)
    self.ff_norm = nnx.LayerNorm(h, **ln)
    self.cfg = cfg

  def attention(self, x_BLH, mask_B1LL, key):
    cfg = self.cfg
    b, l, h = x_BLH.shape
    n = cfg.num_heads
    qkv_BL3ND = dense(self.qkv, x_BLH).reshape(b, l, 3, n, h // n)
    q_BLND, k_BLND, v_BLND = qkv_BL3ND[:, :, 0], qkv_BL3ND[:, :, 1], qkv_BL3ND[:, :, 2]
    if cfg.attention_dropout > 0.0 and key is not None:
      # The fused kernels have no dropout; compute the probabilities explicitly.
      logits_BNLL = jnp.einsum('blnd,bmnd->bnlm', q_BLND, k_BLND) / jnp.sqrt(h // n).astype(x_BLH.dtype)
      logits_BNLL = jnp.where(mask_B1LL, logits_BNLL, jnp.finfo(logits_BNLL.dtype).min)
      probs_BNLL = jax.nn.softmax(logits_BNLL.astype(jnp.float32), axis=-1).astype(x_BLH.dtype)
      probs_BNLL = _dropout(probs_BNLL, cfg.attention_dropout, key)
      out_BLND = jnp.einsum('bnlm,bmnd->blnd', probs_BNLL, v_BLND)
    else:
      out_BLND = _fused_attention(q_BLND, k_BLND, v_BLND, mask_B1LL, cfg.attention_impl)
    return dense(self.attn_out, out_BLND.reshape(b, l, h))

  def __call__(self, x_BLH, mask_B1LL, key):
    keys = jax.random.split(key, 3) if key is not None else (None,) * 3
    rate = self.cfg.dropout
    if self.cfg.layer_norm == 'pre':
      x_BLH = x_BLH + _dropout(self.attention(self.attn_norm(x_BLH), mask_B1LL, keys[0]), rate, keys[1])
      ff_BLH = dense(self.ff_out, jax.nn.gelu(dense(self.ff_in, self.ff_norm(x_BLH)), approximate=False))
      return x_BLH + _dropout(ff_BLH, rate, keys[2])
    x_BLH = self.attn_norm(x_BLH + _dropout(self.attention(x_BLH, mask_B1LL, keys[0]), rate, keys[1]))
    ff_BLH = dense(self.ff_out, jax.nn.gelu(dense(self.ff_in, x_BLH), approximate=False))
    return self.ff_norm(x_BLH + _dropout(ff_BLH, rate, keys[2]))


_REMAT_POLICIES = {
    'full': None,  # save nothing
    'save_dots': jax.checkpoint_policies.checkpoint_dots,
}


@jax.custom_vjp
def _add_vocab_bias(logits_BPV, bias_V):
  return logits_BPV + bias_V


def _add_vocab_bias_fwd(logits_BPV, bias_V):
  return logits_BPV + bias_V, None


def _add_vocab_bias_bwd(_, g_BPV):
  return g_BPV, _sum_rows(g_BPV.reshape(-1, g_BPV.shape[-1]))


_add_vocab_bias.defvjp(_add_vocab_bias_fwd, _add_vocab_bias_bwd)


class MlmHead(nnx.Module):
  """Dense + GELU + LayerNorm, then the decoder tied to the word embeddings (plus a bias)."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.dense = nnx.Linear(cfg.hidden_size, cfg.hidden_size, kernel_init=_init(cfg), dtype=cfg.dtype,
                            param_dtype=cfg.param_dtype, rngs=rngs)
    self.norm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype, rngs=rngs)
    self.bias = nnx.Param(jnp.zeros((cfg.vocab_size,), jnp.dtype(cfg.param_dtype)))

  def __call__(self, x_BPH, word: nnx.Embed):
    x_BPH = self.norm(jax.nn.gelu(dense(self.dense, x_BPH), approximate=False))
    logits_BPV = word.attend(x_BPH)
    return _add_vocab_bias(logits_BPV.astype(jnp.float32), self.bias[...].astype(jnp.float32))


class Bert(nnx.Module):
  """BERT encoder + MLM head. `__call__` returns fp32 logits [B, P, V] at the prediction slots."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embeddings = Embeddings(cfg, rngs=rngs)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return EncoderBlock(cfg, rngs=rngs)

    self.blocks = make_blocks(rngs)
    if cfg.layer_norm == 'pre':
      self.final_norm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype,
                                      param_dtype=cfg.param_dtype, rngs=rngs)
    self.head = MlmHead(cfg, rngs=rngs)

  def encode(self, batch: Mapping[str, jax.Array], dropout_key=None) -> jax.Array:
    """Hidden states [B, L, H]. `dropout_key=None` means deterministic (eval)."""
    cfg = self.cfg
    keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
    x_BLH = self.embeddings(batch, keys[0])
    seg_BL = batch['segment_ids']
    # Attend only within the same packed record. Padding (segment 0) attends to padding, so no
    # softmax row is empty (an empty row would give NaN gradients).
    mask_B1LL = (seg_BL[:, :, None] == seg_BL[:, None, :])[:, None]

    graphdef, stacked = nnx.split(self.blocks)

    def apply_block(x_BLH, block_state, i):
      key = None if keys[1] is None else jax.random.fold_in(keys[1], i)
      return nnx.merge(graphdef, block_state)(x_BLH, mask_B1LL, key)

    if cfg.remat_policy != 'none':
      apply_block = jax.checkpoint(apply_block, policy=_REMAT_POLICIES[cfg.remat_policy])
    if cfg.scan_layers:
      def body(x_BLH, inputs):
        block_state, i = inputs
        return apply_block(x_BLH, block_state, i), None
      x_BLH, _ = jax.lax.scan(body, x_BLH, (stacked, jnp.arange(cfg.num_layers)))
    else:
      for i in range(cfg.num_layers):
        x_BLH = apply_block(x_BLH, jax.tree.map(lambda p, i=i: p[i], stacked), i)
    if cfg.layer_norm == 'pre':
      x_BLH = self.final_norm(x_BLH)
    return x_BLH

  def __call__(self, batch: Mapping[str, jax.Array], dropout_key=None) -> jax.Array:
    x_BLH = self.encode(batch, dropout_key)
    x_BPH = jnp.take_along_axis(x_BLH, batch['mlm_positions'][..., None], axis=1)
    return self.head(x_BPH, self.embeddings.word)


def count_params(params) -> dict[str, int]:
  """Parameter counts: total, and the encoder blocks alone (the MFU formula's N_nonembedding)."""
  total = sum(x.size for x in jax.tree.leaves(params))
  encoder = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
                if re.search(r"'(blocks|final_norm)'", jax.tree_util.keystr(path)))
  return {'total': int(total), 'encoder': int(encoder)}


def model_flops_per_token(cfg: BertConfig, encoder_params: int, masked_fraction: float) -> float:
  """Training FLOPs per real token (forward + backward = 3x forward = 6 per weight):
  the encoder matmuls, attention scores over max_len, and the head on the masked slots only."""
  h = cfg.hidden_size
  attention = 12 * cfg.num_layers * h * cfg.max_len
  head = 6 * (h * h + h * cfg.vocab_size) * masked_fraction
  return float(6 * encoder_params + attention + head)
