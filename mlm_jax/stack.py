"""Stacked encoder blocks, shared by model.Bert and modernbert.ModernBert: created once with a leading
layers axis on every parameter, applied with lax.scan or an unrolled loop, each layer rematerialized
as model.remat_policy says. Scan and loop, remat or not: the same parameters and the same numbers.
"""
import jax
import jax.numpy as jnp
from flax import nnx

REMAT_POLICIES = {
    'full': None,  # save nothing
    'save_dots': jax.checkpoint_policies.checkpoint_dots,
}


def stack_blocks(block_cls, cfg, rngs: nnx.Rngs):
  """`cfg.num_layers` blocks as one module whose parameters have a leading layers axis."""

  @nnx.split_rngs(splits=cfg.num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make_blocks(rngs):
    return block_cls(cfg, rngs=rngs)

  return make_blocks(rngs)


def apply_stacked(apply_block, stacked, x_BLH, cfg):
  """`x_BLH` through every layer, `apply_block(x_BLH, layer_state, i)`: under lax.scan (`i` traced)
  when cfg.scan_layers, else an unrolled loop (`i` a Python int)."""
  if cfg.remat_policy != 'none':
    apply_block = jax.checkpoint(apply_block, policy=REMAT_POLICIES[cfg.remat_policy],
                                 static_argnums=() if cfg.scan_layers else (2,))
  if cfg.scan_layers:
    def body(x_BLH, inputs):
      block_state, i = inputs
      return apply_block(x_BLH, block_state, i), None
    x_BLH, _ = jax.lax.scan(body, x_BLH, (stacked, jnp.arange(cfg.num_layers)))
    return x_BLH
  for i in range(cfg.num_layers):
    x_BLH = apply_block(x_BLH, jax.tree.map(lambda p, i=i: p[i], stacked), i)
  return x_BLH
