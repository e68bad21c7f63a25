"""BERT for masked-language modelling in Flax NNX.

The encoder blocks are always created stacked (one leading `layers` axis on every block parameter),
so `scan_layers` only changes how they are applied (lax.scan or an unrolled loop) and never the
parameters or the numbers. The MLM head runs on the P prediction slots only, not on all L positions.
Dropout, the dense layers and attention call the backend-specific kernels of ops.py.

Shape letters: B batch, L sequence, P prediction slots, H hidden, N heads, D head dim, F feed-forward,
V vocabulary.
"""
import dataclasses
import re
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from mlm_jax import modernbert
from mlm_jax import ops
from mlm_jax import stack


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
  arch: str = 'bert'  # 'bert' (this file) or 'modernbert' (modernbert.py)
  local_attention: int = 128
  global_attn_every_n_layers: int = 3
  global_rope_theta: float = 160000.0
  local_rope_theta: float = 10000.0

  @classmethod
  def from_config(cls, model_config, dtype: str) -> 'BertConfig':
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in model_config.items() if k in fields}
    kw['extra_embeddings'] = tuple(sorted(dict(model_config.extra_embeddings).items()))
    kw['dtype'] = dtype
    return cls(**kw)


def _init(cfg):
  return nnx.initializers.truncated_normal(stddev=cfg.init_std)


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
    return ops.dropout(x_BLH, self.dropout, dropout_key)


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
    qkv_BL3ND = ops.dense(self.qkv, x_BLH).reshape(b, l, 3, n, h // n)
    q_BLND, k_BLND, v_BLND = qkv_BL3ND[:, :, 0], qkv_BL3ND[:, :, 1], qkv_BL3ND[:, :, 2]
    out_BLND = ops.attention(q_BLND, k_BLND, v_BLND, mask_B1LL, cfg.attention_impl,
                             cfg.attention_dropout, key)
    return ops.dense(self.attn_out, out_BLND.reshape(b, l, h))

  def __call__(self, x_BLH, mask_B1LL, key):
    keys = jax.random.split(key, 3) if key is not None else (None,) * 3
    rate = self.cfg.dropout
    if self.cfg.layer_norm == 'pre':
      attn_BLH = self.attention(self.attn_norm(x_BLH), mask_B1LL, keys[0])
      x_BLH = x_BLH + ops.dropout(attn_BLH, rate, keys[1])
      ff_BLF = jax.nn.gelu(ops.dense(self.ff_in, self.ff_norm(x_BLH)), approximate=False)
      return x_BLH + ops.dropout(ops.dense(self.ff_out, ff_BLF), rate, keys[2])
    attn_BLH = self.attention(x_BLH, mask_B1LL, keys[0])
    x_BLH = self.attn_norm(x_BLH + ops.dropout(attn_BLH, rate, keys[1]))
    ff_BLF = jax.nn.gelu(ops.dense(self.ff_in, x_BLH), approximate=False)
    return self.ff_norm(x_BLH + ops.dropout(ops.dense(self.ff_out, ff_BLF), rate, keys[2]))


class MlmHead(nnx.Module):
  """Dense + GELU + LayerNorm, then the decoder tied to the word embeddings (plus a bias)."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.dense = nnx.Linear(cfg.hidden_size, cfg.hidden_size, kernel_init=_init(cfg), dtype=cfg.dtype,
                            param_dtype=cfg.param_dtype, rngs=rngs)
    self.norm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype, rngs=rngs)
    self.bias = nnx.Param(jnp.zeros((cfg.vocab_size,), jnp.dtype(cfg.param_dtype)))

  def __call__(self, x_BPH, word: nnx.Embed):
    x_BPH = self.norm(jax.nn.gelu(ops.dense(self.dense, x_BPH), approximate=False))
    return ops.add_vocab_bias(ops.tied_logits(word, x_BPH), self.bias[...].astype(jnp.float32))


class Bert(nnx.Module):
  """BERT encoder + MLM head. `__call__` returns fp32 logits [B, P, V] at the prediction slots."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embeddings = Embeddings(cfg, rngs=rngs)

    self.blocks = stack.stack_blocks(EncoderBlock, cfg, rngs)
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

    x_BLH = stack.apply_stacked(apply_block, stacked, x_BLH, cfg)
    if cfg.layer_norm == 'pre':
      x_BLH = self.final_norm(x_BLH)
    return x_BLH

  def __call__(self, batch: Mapping[str, jax.Array], dropout_key=None) -> jax.Array:
    x_BLH = self.encode(batch, dropout_key)
    x_BPH = jnp.take_along_axis(x_BLH, batch['mlm_positions'][..., None], axis=1)
    return self.head(x_BPH, self.embeddings.word)


def build(cfg: BertConfig, rngs: nnx.Rngs) -> nnx.Module:
  """The model of `cfg.arch`: Bert or modernbert.ModernBert (the same interface)."""
  if cfg.arch == 'modernbert':
    return modernbert.ModernBert(cfg, rngs=rngs)
  return Bert(cfg, rngs=rngs)


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
  if cfg.arch == 'modernbert':  # local layers score only the keys in their window
    n_global = len(range(0, cfg.num_layers, cfg.global_attn_every_n_layers))
    window = min(cfg.max_len, cfg.local_attention + 1)
    attention = 12 * h * (n_global * cfg.max_len + (cfg.num_layers - n_global) * window)
  head = 6 * (h * h + h * cfg.vocab_size) * masked_fraction
  return float(6 * encoder_params + attention + head)
