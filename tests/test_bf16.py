"""bfloat16 compute: every matmul of the compiled train step, forward and backward, takes bf16
operands (fp32 accumulation), and the bf16 kernels of mlm_jax.ops compute the bf16-rounded math.

XLA:CPU computes a matmul in fp32 when an operand or its result is bf16-in/bf16-out or fp32 (what
plain autodiff produces), so these tests fail where one slips through. The kernel tests are for
CPU (elsewhere ops takes the plain forms); the compiled-step tests hold on any backend.
"""
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from mlm_jax import ops
from mlm_jax import train
from tests.test_train_step import batches, tiny_config
from tools.profile_step import matmuls

cpu_only = pytest.mark.skipif(jax.default_backend() != 'cpu', reason="ops' bf16 kernels are CPU's")
gpu_only = pytest.mark.skipif(jax.default_backend() != 'gpu', reason='a GPU (tools/gpu_check.sh)')


def _bf16(x):
  """x rounded to bfloat16, back in float64 (for numpy references)."""
  return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


_HLO = """HloModule jit_train_step

%fused_computation.3 (param_0.1: bf16[64,32], param_1.2: f32[32,16]) -> f32[64,16] {
  %param_0.1 = bf16[64,32]{1,0} parameter(0)
  %param_1.2 = f32[32,16]{1,0} parameter(1)
  ROOT %dot.1 = f32[64,16]{1,0} dot(%param_0.1, %param_1.2), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(train_step)/transpose(jvp(vmap(BTNH,BSNH->BNTS)))/dot_general" stack_frame_id=9}
}

ENTRY %main.9 (p0: bf16[8,4], p1: bf16[4,2]) -> f32[8,2] {
  %p0 = bf16[8,4]{1,0} parameter(0)
  %p1 = bf16[4,2]{1,0} parameter(1)
  %dot.2 = f32[8,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(train_step)/jvp()/dot_general"}
  %mm = bf16[8,2]{1,0} custom-call(%p0, %p1), custom_call_target="__onednn$matmul"
  %gemm = (bf16[8,2]{1,0}, s8[1024]{0}) custom-call(%p0, %p1), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(train_step)/transpose(jvp())/dot_general"}
  %attn = (bf16[8,2]{1,0}, u8[0]{0}) custom-call(%p0, %p1), custom_call_target="__cudnn$fmhaSoftmax"
  ROOT %add.3 = f32[8,2]{1,0} add(%dot.2, %dot.2)
}
"""


def test_matmul_table_reads_each_operand_s_dtype_in_its_computation():
  found = matmuls(_HLO)
  assert [(m.direction, m.source, m.operands, m.result) for m in found] == [
      ('bwd', 'BTNH,BSNH->BNTS/dot_general', ('bf16[64,32]', 'f32[32,16]'), 'f32[64,16]'),
      ('fwd', 'dot_general', ('bf16[8,4]', 'bf16[4,2]'), 'f32[8,2]'),
      ('?', '(no metadata)', ('bf16[8,4]', 'bf16[4,2]'), 'bf16[8,2]'),
      ('bwd', 'dot_general', ('bf16[8,4]', 'bf16[4,2]'), 'bf16[8,2]')]
  assert found[0].operand_dtypes == ('bf16', 'f32')


def _step_matmuls(dtype, **overrides):
  """Matmuls of the compiled tiny train step, after one step has run (XLA:CPU has compiled bf16
  dots it could not execute)."""
  config = tiny_config(**{'model.dtype': dtype, **overrides})
  trainer = train.Trainer(config)
  batch = batches(config, 1)[0]
  trainer.compile_steps(batch)
  _, metrics = trainer.train_step(trainer.init_state(), batch)
  assert np.isfinite(float(metrics['loss_sum']))
  return matmuls(trainer.compiled_train_step.as_text())


def _is_matvec(m) -> bool:
  """A matrix-vector product: the bias gradients' column sums (`ops._sum_rows`). Memory-bound, and
  XLA:CPU has no bf16 matvec (it converts the cotangent to fp32 first), so they stay fp32."""
  return any(re.search(r'[\[,]1[\],]', shape) for shape in (*m.operands, m.result))


def _by_dtypes(found):
  out = {}
  for m in found:
    key = (m.direction, m.operand_dtypes)
    out[key] = out.get(key, 0) + 1
  return out


@cpu_only
@pytest.mark.parametrize('overrides', [
    {}, {'model.attention_dropout': 0.1, 'model.layer_norm': 'pre', 'model.scan_layers': True}])
def test_every_matmul_of_the_bf16_step_takes_bf16_operands(overrides):
  found = [m for m in _step_matmuls('bfloat16', **overrides) if not _is_matvec(m)]
  not_bf16 = [m for m in found if m.operand_dtypes != ('bf16', 'bf16')]
  assert not not_bf16, '\n'.join(map(str, not_bf16))
  # All of them, so none was computed where this test does not look: per layer QKV, the two
  # attention products, attention out, FF in and out; the head's dense and decoder. Backward: the
  # gradients of both operands of each.
  layers = 1 if overrides.get('model.scan_layers') else 2  # a scan has its body once
  forward = 6 * layers + 2
  assert _by_dtypes(found) == {('fwd', ('bf16', 'bf16')): forward,
                               ('bwd', ('bf16', 'bf16')): 2 * forward}


@cpu_only
def test_the_fp32_step_has_the_same_matmuls_in_fp32():
  fp32 = [m for m in _step_matmuls('float32') if not _is_matvec(m)]
  assert {m.operand_dtypes for m in fp32} == {('f32', 'f32')}
  bf16 = [m for m in _step_matmuls('bfloat16') if not _is_matvec(m)]
  assert sorted(m.direction for m in fp32) == sorted(m.direction for m in bf16)


@cpu_only
@pytest.mark.parametrize('bias', [True, False])
def test_bf16_dense_is_the_rounded_math_with_fp32_weight_gradients(bias):
  rng = np.random.default_rng(0)
  layer = nnx.Linear(16, 24, use_bias=bias, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  if bias:
    layer.bias[...] = jnp.asarray(rng.normal(size=24), jnp.float32)
  graphdef, params = nnx.split(layer)
  x = jnp.asarray(rng.normal(size=(2, 3, 16)), jnp.bfloat16)
  w = rng.normal(size=(2, 3, 24)).astype(np.float32)

  def loss(params, x):
    y = ops.dense(nnx.merge(graphdef, params), x)
    assert y.dtype == jnp.bfloat16
    return jnp.sum(y.astype(jnp.float32) * w)

  y = ops.dense(layer, x)
  dparams, dx = jax.grad(loss, argnums=(0, 1))(params, x)
  # Brute force in float64 from the bf16-rounded operands: y and dx are rounded to bf16 once, the
  # kernel and bias gradients are fp32 sums of bf16 products (no bf16 rounding).
  x64, k16 = _bf16(x).reshape(6, 16), _bf16(layer.kernel[...])
  b64 = np.asarray(layer.bias[...], np.float64) if bias else 0.0
  dy = _bf16(w).reshape(6, 24)
  np.testing.assert_allclose(np.asarray(y, np.float64).reshape(6, 24), _bf16(x64 @ k16 + b64),
                             rtol=2**-8, atol=1e-6)
  np.testing.assert_allclose(np.asarray(dx, np.float64).reshape(6, 16), _bf16(dy @ k16.T),
                             rtol=2**-8, atol=1e-6)
  np.testing.assert_allclose(dparams['kernel'][...], x64.T @ dy, rtol=1e-5, atol=1e-5)
  assert dparams['kernel'][...].dtype == jnp.float32
  if bias:
    np.testing.assert_allclose(dparams['bias'][...], dy.sum(0), rtol=1e-5, atol=1e-5)


@cpu_only
def test_bf16_tied_logits_are_fp32_sums_and_their_gradients_too():
  rng = np.random.default_rng(1)
  word = nnx.Embed(40, 16, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(word)
  x = jnp.asarray(rng.normal(size=(2, 3, 16)), jnp.bfloat16)
  w = rng.normal(size=(2, 3, 40)).astype(np.float32)

  def loss(params, x):
    logits = ops.tied_logits(nnx.merge(graphdef, params), x)
    assert logits.dtype == jnp.float32
    return jnp.sum(logits * w)

  logits = ops.tied_logits(word, x)
  dparams, dx = jax.grad(loss, argnums=(0, 1))(params, x)
  x64, e16, g = _bf16(x).reshape(6, 16), _bf16(word.embedding[...]), _bf16(w).reshape(6, 40)
  np.testing.assert_allclose(np.asarray(logits).reshape(6, 40), x64 @ e16.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dx, np.float64).reshape(6, 16), _bf16(g @ e16),
                             rtol=2**-8, atol=1e-6)
  np.testing.assert_allclose(dparams['embedding'][...], g.T @ x64, rtol=1e-5, atol=1e-5)


@cpu_only
@pytest.mark.parametrize('rate', [0.0, 0.5])
def test_bf16_attention_and_its_gradients_are_close_to_fp32(rate):
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 16, 4, 8)), jnp.bfloat16) for _ in range(3))
  seg = jnp.asarray([[1] * 10 + [2] * 6, [1] * 16])
  mask = (seg[:, :, None] == seg[:, None, :])[:, None]
  w = jnp.asarray(rng.normal(size=(2, 16, 4, 8)), jnp.float32)
  key = jax.random.key(3) if rate else None

  def loss(q, k, v):
    out = ops.attention(q, k, v, mask, 'auto', rate, key)
    assert out.dtype == q.dtype
    return jnp.sum(out.astype(jnp.float32) * w)

  f32 = lambda *xs: [x.astype(jnp.float32) for x in xs]
  want = jax.grad(loss, argnums=(0, 1, 2))(*f32(q, k, v))
  got = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(want, got):
    a, b = np.asarray(a), np.asarray(b, np.float32)
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 2e-2
  if rate:  # the dropout masks are the fp32 run's, so the key reached the kernel
    out16 = ops.attention(q, k, v, mask, 'auto', rate, key).astype(jnp.float32)
    out32 = ops.attention(*f32(q, k, v), mask, 'auto', rate, key)
    np.testing.assert_array_equal(np.asarray(out16) == 0, np.asarray(out32) == 0)


def _attention_inputs(seed, b=2, l=128, n=4, d=64):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(b, l, n, d)), jnp.bfloat16) for _ in range(3))
  seg = np.ones((b, l), np.int32)
  seg[0, 50:] = 2  # two packed records, and padding (segment 0) at the end of row 1
  seg[1, 100:] = 0
  mask = jnp.asarray((seg[:, :, None] == seg[:, None, :])[:, None])
  return q, k, v, mask


@gpu_only
def test_cudnn_attention_matches_xla_with_packed_segments_and_gradients():
  q, k, v, mask = _attention_inputs(0)
  w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

  def loss(q, k, v, impl):
    return jnp.sum(ops.attention(q, k, v, mask, impl).astype(jnp.float32) * w)

  for impl in ('cudnn', 'xla'):
    assert ops.attention(q, k, v, mask, impl).dtype == jnp.bfloat16
  hlo = jax.jit(lambda q, k, v: ops.attention(q, k, v, mask, 'cudnn')).lower(q, k, v).compile()
  assert 'cudnn' in hlo.as_text()  # the fused kernel ran, not a fallback
  want = np.asarray(ops.attention(q, k, v, mask, 'xla'), np.float32)
  got = np.asarray(ops.attention(q, k, v, mask, 'cudnn'), np.float32)
  np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)
  grads = [jax.grad(loss, argnums=(0, 1, 2))(q, k, v, impl) for impl in ('xla', 'cudnn')]
  for a, b in zip(*grads):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 2e-2


@gpu_only
def test_bf16_step_on_a_gpu_runs_bf16_gemms_and_cudnn_attention():
  shape = {'model.hidden_size': 128, 'model.num_heads': 2, 'model.intermediate_size': 256,
           'model.max_len': 128}  # head size 64: cuDNN's
  found = _step_matmuls('bfloat16', **shape, **{'model.attention_impl': 'cudnn'})
  not_bf16 = [m for m in found if m.operand_dtypes != ('bf16', 'bf16')]
  assert found and not not_bf16, '\n'.join(map(str, not_bf16))
