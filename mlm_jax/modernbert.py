"""ModernBERT for masked-language modelling in Flax NNX: transformers' ModernBertForMaskedLM, with
model.Bert's interface (fp32 logits at the prediction slots only; `encode`; stacked blocks, so
`scan_layers` and `remat_policy` work as there).

What differs from BERT (all as in transformers' modeling_modernbert.py):
- token embeddings + a bias-free LayerNorm; no position or token-type tables: rotary embeddings on
  the whole head, base global_rope_theta on global layers, local_rope_theta on local ones, from
  batch['positions'] (which restart in every packed record);
- pre-LN blocks, every LayerNorm and linear layer without bias; layer 0 has no attention norm (the
  embedding norm precedes it), so the stacked attention norms have num_layers - 1 rows (1 unused
  row for a 1-layer model);
- layer i attends globally when i % global_attn_every_n_layers == 0, else to the tokens at most
  local_attention // 2 away (and always within its own record);
- GeGLU feed-forward: ff_in's first intermediate_size outputs go through the exact GELU and
  multiply the second (the gate);
- a final norm; the head: dense (no bias) -> GELU -> norm -> decoder tied to the embeddings, with
  a bias.
Dropout as transformers': model.dropout on the embeddings and on the GeGLU activation
(embedding_dropout, mlp_dropout), model.attention_dropout on the attention probabilities and the
attention output.

Shape letters: B batch, L sequence, P prediction slots, H hidden, N heads, D head dim, F feed-forward,
V vocabulary.
"""
import math
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from mlm_jax import ops
from mlm_jax import stack

# transformers' initializer_cutoff_factor: weights are drawn from N(0, std²) cut at ±2 std.
INIT_CUTOFF = 2.0


def _init(std: float):
  """torch's trunc_normal_(std, a=-2 std, b=2 std): std is the untruncated one, as in transformers."""
  def init(key, shape, dtype=jnp.float32):
    return (std * jax.random.truncated_normal(key, -INIT_CUTOFF, INIT_CUTOFF, shape,
                                              jnp.float32)).astype(dtype)
  return init


def init_stds(cfg) -> tuple[float, float]:
  """(std of input-side weights, std of output projections): transformers' 'in' and 'out'."""
  return cfg.init_std, cfg.init_std / math.sqrt(2.0 * cfg.num_layers)


def _norm(cfg, rngs):
  return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, use_bias=False, dtype=cfg.dtype,
                       param_dtype=cfg.param_dtype, rngs=rngs)


def _linear(cfg, n_in, n_out, std, rngs):
  return nnx.Linear(n_in, n_out, use_bias=False, kernel_init=_init(std), dtype=cfg.dtype,
                    param_dtype=cfg.param_dtype, rngs=rngs)


def is_global(layer, every: int):
  """Whether layer `layer` (an int, or a traced index under scan) attends globally."""
  return layer % every == 0


def _pick(flag, a, b):
  """`a if flag else b`; a traced flag (a scanned layer index) selects with jnp.where."""
  if isinstance(flag, bool):
    return a if flag else b
  return jax.tree.map(lambda x, y: jnp.where(flag, x, y), a, b)


def rotary_tables(positions_BL, head_dim: int, theta: float):
  """(cos, sin), each float32 [B, L, 1, D/2]: angle position * theta^(-2k/D) for k < D/2."""
  inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles_BLK = positions_BL.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles_BLK)[:, :, None], jnp.sin(angles_BLK)[:, :, None]


def apply_rotary(x_BLND, cos_BL1K, sin_BL1K):
  """Rotates the pairs (x[k], x[k + D/2]) by their angle (transformers' rotate_half layout), in
  float32."""
  x = x_BLND.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos_BL1K - x2 * sin_BL1K, x2 * cos_BL1K + x1 * sin_BL1K], axis=-1)
  return out.astype(x_BLND.dtype)


def attention_masks(segment_ids_BL, local_attention: int):
  """(global, local) boolean masks [B, 1, L, L]: same record; the local one also |i - j| <=
  local_attention // 2. Padding (segment 0) attends to padding, so no softmax row is empty."""
  seg_BL = segment_ids_BL
  same_B1LL = (seg_BL[:, :, None] == seg_BL[:, None, :])[:, None]
  idx = jnp.arange(seg_BL.shape[1])
  near_LL = jnp.abs(idx[:, None] - idx[None, :]) <= local_attention // 2
  return same_B1LL, same_B1LL & near_LL


class Embeddings(nnx.Module):
  """Token embeddings, a bias-free LayerNorm, dropout."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.word = nnx.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=_init(cfg.init_std),
                          dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.norm = _norm(cfg, rngs)
    self.dropout = cfg.dropout

  def __call__(self, batch, dropout_key):
    return ops.dropout(self.norm(self.word(batch['input_ids'])), self.dropout, dropout_key)


class EncoderBlock(nnx.Module):
  """Pre-LN attention (fused bias-free qkv, rotary, optional window) and a GeGLU feed-forward."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    h, f = cfg.hidden_size, cfg.intermediate_size
    std_in, std_out = init_stds(cfg)
    self.attn_norm = _norm(cfg, rngs)  # layer 0's row is dropped (ModernBert.__init__)
    self.qkv = _linear(cfg, h, 3 * h, std_in, rngs)
    self.attn_out = _linear(cfg, h, h, std_out, rngs)
    self.ff_norm = _norm(cfg, rngs)
    self.ff_in = _linear(cfg, h, 2 * f, std_in, rngs)  # [GELU input | gate]
    self.ff_out = _linear(cfg, f, h, std_out, rngs)
    self.cfg = cfg

  def attention(self, x_BLH, mask_B1LL, rotary, keys):
    cfg = self.cfg
    b, l, h = x_BLH.shape
    n = cfg.num_heads
    qkv_BL3ND = ops.dense(self.qkv, x_BLH).reshape(b, l, 3, n, h // n)
    q_BLND = apply_rotary(qkv_BL3ND[:, :, 0], *rotary)
    k_BLND = apply_rotary(qkv_BL3ND[:, :, 1], *rotary)
    out_BLND = ops.attention(q_BLND, k_BLND, qkv_BL3ND[:, :, 2], mask_B1LL, cfg.attention_impl,
                             cfg.attention_dropout, keys[0])
    out_BLH = ops.dense(self.attn_out, out_BLND.reshape(b, l, h))
    return ops.dropout(out_BLH, cfg.attention_dropout, keys[1])

  def __call__(self, x_BLH, first, mask_B1LL, rotary, key):
    """`first`: layer 0, which has no attention norm (bool, or traced under scan)."""
    cfg = self.cfg
    keys = jax.random.split(key, 3) if key is not None else (None,) * 3
    if isinstance(first, bool):
      attn_in_BLH = x_BLH if first else self.attn_norm(x_BLH)
    else:
      attn_in_BLH = jnp.where(first, x_BLH, self.attn_norm(x_BLH))
    x_BLH = x_BLH + self.attention(attn_in_BLH, mask_B1LL, rotary, keys[:2])
    gelu_BLF, gate_BLF = jnp.split(ops.dense(self.ff_in, self.ff_norm(x_BLH)), 2, axis=-1)
    act_BLF = ops.dropout(jax.nn.gelu(gelu_BLF, approximate=False) * gate_BLF, cfg.dropout, keys[2])
    return x_BLH + ops.dense(self.ff_out, act_BLF)


class MlmHead(nnx.Module):
  """Dense (no bias) + GELU + norm, then the decoder tied to the token embeddings, plus a bias."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.dense = _linear(cfg, cfg.hidden_size, cfg.hidden_size, init_stds(cfg)[1], rngs)
    self.norm = _norm(cfg, rngs)
    self.bias = nnx.Param(jnp.zeros((cfg.vocab_size,), jnp.dtype(cfg.param_dtype)))

  def __call__(self, x_BPH, word: nnx.Embed):
    x_BPH = self.norm(jax.nn.gelu(ops.dense(self.dense, x_BPH), approximate=False))
    return ops.add_vocab_bias(ops.tied_logits(word, x_BPH), self.bias[...].astype(jnp.float32))


class ModernBert(nnx.Module):
  """ModernBERT encoder + MLM head. `__call__` returns fp32 logits [B, P, V] at the prediction
  slots."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embeddings = Embeddings(cfg, rngs=rngs)

    self.blocks = stack.stack_blocks(EncoderBlock, cfg, rngs)
    # Layer 0 normalizes nothing before attention: its row would be a parameter that never
    # trains, which transformers' model does not have. (A 1-layer model keeps it, unused: orbax
    # cannot save an empty array.)
    if cfg.num_layers > 1:
      self.blocks.attn_norm.scale = nnx.Param(self.blocks.attn_norm.scale[...][1:])
    self.final_norm = _norm(cfg, rngs)
    self.head = MlmHead(cfg, rngs=rngs)

  def encode(self, batch: Mapping[str, jax.Array], dropout_key=None) -> jax.Array:
    """Hidden states [B, L, H] after the final norm. `dropout_key=None`: deterministic (eval)."""
    cfg = self.cfg
    keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
    x_BLH = self.embeddings(batch, keys[0])
    global_mask, local_mask = attention_masks(batch['segment_ids'], cfg.local_attention)
    head_dim = cfg.hidden_size // cfg.num_heads
    global_rotary = rotary_tables(batch['positions'], head_dim, cfg.global_rope_theta)
    local_rotary = rotary_tables(batch['positions'], head_dim, cfg.local_rope_theta)

    graphdef, stacked = nnx.split(self.blocks)
    if cfg.num_layers > 1:  # layer 0's row again (never read), so every layer has one (scan)
      stacked = jax.tree_util.tree_map_with_path(
          lambda path, p: jnp.concatenate([jnp.ones_like(p[:1]), p])
          if "'attn_norm'" in jax.tree_util.keystr(path) else p, stacked)

    def apply_block(x_BLH, block_state, i):
      key = None if keys[1] is None else jax.random.fold_in(keys[1], i)
      glob = is_global(i, cfg.global_attn_every_n_layers)
      mask_B1LL = _pick(glob, global_mask, local_mask)
      rotary = _pick(glob, global_rotary, local_rotary)
      first = i == 0
      return nnx.merge(graphdef, block_state)(x_BLH, first, mask_B1LL, rotary, key)

    return self.final_norm(stack.apply_stacked(apply_block, stacked, x_BLH, cfg))

  def __call__(self, batch: Mapping[str, jax.Array], dropout_key=None) -> jax.Array:
    x_BLH = self.encode(batch, dropout_key)
    x_BPH = jnp.take_along_axis(x_BLH, batch['mlm_positions'][..., None], axis=1)
    return self.head(x_BPH, self.embeddings.word)
