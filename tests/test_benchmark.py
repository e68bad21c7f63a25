"""tools/benchmark.py on a tiny config, mlm_jax.autotune on CPU, and the launcher's environment."""
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from mlm_jax import autotune, launch
from mlm_jax import train
from mlm_jax.synthetic import random_batch
from tests.test_train_step import batches, tiny_config
from tools import benchmark

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_runs_the_train_step_on_a_tiny_config():
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one CPU device, as a user
  out = subprocess.run(
      [sys.executable, os.path.join(_REPO, 'tools', 'benchmark.py'), '--layers', '1', '--hidden',
       '32', '--heads', '2', '--intermediate', '64', '--vocab', '97', '--seq', '32', '--batch', '4',
       '--steps', '5', '--accum', '2', '--peak_gflops', '100', '--no_launch'],
      env=env, capture_output=True, text=True, timeout=120, check=True).stdout
  m = re.search(r'^RESULT tokens_per_s=([0-9.]+) step_ms=([0-9.]+) mfu=([0-9.]+)$', out, re.M)
  assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0
  assert re.search(r'compile_s=[0-9.]+', out) and re.search(r'peak_rss_mb=\d+', out)
  # The reference's dropout (FlaxBert drops attention probabilities too), said in the output.
  assert 'dropout=0.1 attention_dropout=0.1 mask_rate=0.15' in out


def test_benchmark_runs_modernbert_on_packed_rows_in_bf16():
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  out = subprocess.run(
      [sys.executable, os.path.join(_REPO, 'tools', 'benchmark.py'), '--arch', 'modernbert',
       '--layers', '2', '--hidden', '32', '--heads', '2', '--intermediate', '48', '--vocab', '97',
       '--seq', '64', '--batch', '2', '--steps', '4', '--packed', '3', '--dtype', 'bfloat16',
       '--attention_impl', 'xla', '--peak_gflops', '100', '--no_launch'],
      env=env, capture_output=True, text=True, timeout=180, check=True).stdout
  assert 'arch=modernbert dtype=bfloat16 attention_impl=xla' in out
  # configs/modernbert_base.py's dropout (none) and mask rate.
  assert 'dropout=0.0 attention_dropout=0.0 mask_rate=0.3 packed_records_per_row=3' in out
  assert re.search(r'^RESULT tokens_per_s=[0-9.]+ step_ms=[0-9.]+ mfu=[0-9.]+$', out, re.M)


def test_dropout_defaults_and_overrides():
  args = benchmark.parse_args([])
  assert (args.dropout, args.attention_dropout) == (0.1, 0.1)  # the reference's, for --compare
  args = benchmark.parse_args(['--attention_dropout', '0'])
  assert (args.dropout, args.attention_dropout) == (0.1, 0.0)
  args = benchmark.parse_args(['--arch', 'modernbert'])
  assert (args.dropout, args.attention_dropout) == (0.0, 0.0)
  config = benchmark.make_config(benchmark.parse_args(['--attention_impl', 'xla']))
  assert (config.model.attention_dropout, config.model.attention_impl) == (0.1, 'xla')
  args = benchmark.parse_args(['--attention_impl', 'cudnn'])  # the fused kernel has no dropout
  assert (args.dropout, args.attention_dropout) == (0.1, 0.0)
  with pytest.raises(SystemExit):
    benchmark.parse_args(['--attention_impl', 'cudnn', '--attention_dropout', '0.1'])


def test_pack_makes_rows_of_k_records_with_positions_restarting():
  batch = random_batch(0, 5, 40, 8, 97)
  packed = benchmark.pack(batch, 4, seed=1)
  for seg, pos in zip(packed['segment_ids'], packed['positions']):
    assert list(np.unique(seg)) == [1, 2, 3, 4] and np.all(np.diff(seg) >= 0)
    for k in range(1, 5):
      length = int(np.sum(seg == k))
      assert length >= 2
      assert list(pos[seg == k]) == list(range(length))
  for key in ('input_ids', 'mlm_positions', 'mlm_targets', 'mlm_weights'):
    np.testing.assert_array_equal(packed[key], batch[key])
  assert not np.array_equal(packed['segment_ids'][0], packed['segment_ids'][1])  # random cuts


def test_profile_step_lists_the_step_s_ops(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  out = subprocess.run(
      [sys.executable, os.path.join(_REPO, 'tools', 'profile_step.py'), '--layers', '1', '--hidden',
       '32', '--heads', '2', '--intermediate', '64', '--vocab', '97', '--seq', '32', '--batch', '4',
       '--steps', '2', '--top', '5', '--no_launch', f'--trace_dir={tmp_path}'],
      env=env, capture_output=True, text=True, timeout=180, check=True).stdout
  assert re.search(r'^step \(device time\): [0-9.]+ ms', out, re.M)
  top_ops = out.split('per kind of op')[0]
  rows = re.findall(r'^\s+[0-9.]+\s{2}(\S+)\s+\S+\s+(.*)$', top_ops, re.M)
  assert len(rows) == 5, out  # the top ops (their order is noise at this size)
  # Every op has its source: the train step's JAX code, or a copy XLA inserted on its own.
  assert all('jit(train_step)' in src or src == '(inserted by XLA)' for _, src in rows), out
  assert any('jit(train_step)' in src for _, src in rows), out
  assert 'matmul (ynn_fusion)' in out


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_step():
  """tools/gpu_check.sh with GPU_CHECK_DRY=1: its tests and benchmarks, tiny, on the CPU (~80 s)."""
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  proc = subprocess.run([os.path.join(_REPO, 'tools', 'gpu_check.sh')],
                        env={**env, 'GPU_CHECK_DRY': '1', 'PYTHON': sys.executable},
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  for name in ('bert_base_s128', 'bert_base_s512'):
    assert re.search(rf'^{name}: RESULT tokens_per_s=[0-9.]+ step_ms=[0-9.]+ mfu=[0-9.]+$',
                     proc.stdout, re.M), proc.stdout[-3000:]
  assert 'failed steps: 0' in proc.stdout


def test_compare_skips_cleanly_without_the_reference(tmp_path):
  out = subprocess.run(
      [sys.executable, os.path.join(_REPO, 'tools', 'benchmark.py'), '--compare',
       '--reference_dir', str(tmp_path)], capture_output=True, text=True, timeout=60,
      check=True).stdout
  assert 'skipping the comparison' in out


def test_candidate_accums_split_the_batch_evenly_over_devices():
  assert autotune.candidate_accums(32, 1) == [1, 2, 4, 8, 16, 32]
  assert autotune.candidate_accums(32, 8) == [1, 2, 4]
  assert autotune.candidate_accums(24, 8) == [1, 3]


def test_pick_grad_accum_on_cpu_takes_the_smallest_without_compiling():
  def compile_step(a):
    raise AssertionError('nothing should be compiled without a memory limit')
  assert autotune.memory_limit_bytes(jax.devices('cpu')[0]) is None
  assert autotune.pick_grad_accum(compile_step, 32, 8) == 1


def test_pick_grad_accum_picks_the_smallest_count_that_fits():
  config = tiny_config(**{'model.hidden_size': 64, 'model.intermediate_size': 256})
  trainer = train.Trainer(config, workdir=None)
  batch = batches(config, 1)[0]
  compile_step = lambda a: trainer.compile_train_step(batch, a)
  need = {a: autotune.compiled_bytes(compile_step(a)) for a in (1, 4)}
  assert need[4] < need[1]  # smaller micro-batches, fewer live activations
  limit = int((need[1] + need[4]) / 2 / autotune.DEFAULT_HEADROOM)  # 1 does not fit, 4 does
  picked = autotune.pick_grad_accum(compile_step, 32, jax.device_count(), memory_limit=limit)
  assert 1 < picked <= 4
  with pytest.raises(autotune.OutOfMemory, match='train.grad_accum_steps'):
    autotune.pick_grad_accum(compile_step, 32, jax.device_count(), memory_limit=1000,
                             config=config)


def test_oom_message_names_the_settings_to_change():
  msg = autotune.oom_message(tiny_config(), 'RESOURCE_EXHAUSTED: out of memory')
  for field in ('train.grad_accum_steps', 'model.remat_policy', 'model.dtype', 'train.batch_size'):
    assert field in msg
  assert autotune.is_resource_exhausted(RuntimeError('RESOURCE_EXHAUSTED: Out of memory'))
  assert not autotune.is_resource_exhausted(ValueError('shapes do not match'))


def test_launch_env_adds_settings_once_and_plain_env_removes_them():
  user = {'PATH': '/bin', 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  env = launch.launch_env(user)
  assert env['XLA_FLAGS'].startswith('--xla_force_host_platform_device_count=8')
  assert launch.launch_env(env) == env  # idempotent: a second launch changes nothing
  assert launch.plain_env({**env, launch.GUARD: '1'}) == user
