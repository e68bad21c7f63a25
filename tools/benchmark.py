r"""Train-step benchmark: mlm_jax's real train step on synthetic batches, and the same against a reference.

  # ours, BERT-small shape (same arguments as shared/bench/hf_flax_mlm.py):
  python tools/benchmark.py --layers 4 --hidden 512 --heads 8 --intermediate 2048 --vocab 30522 \
      --seq 128 --batch 16 --steps 20 [--dtype bfloat16] [--accum 2] [--remat full] [--scan]
  # ours and the Hugging Face Flax reference alternately (A B A B ...), median ratio of tokens/s:
  python tools/benchmark.py ... --compare [--rounds 3] [--reference_launch]
  # ModernBERT-base on packed rows (4 records per row), bf16 with cuDNN attention (a GPU):
  python tools/benchmark.py --arch modernbert --layers 22 --hidden 768 --heads 12 \
      --intermediate 1152 --vocab 30522 --seq 1024 --batch 32 --packed 4 --dtype bfloat16 \
      --attention_impl cudnn

The timed path is the training one: `base_config()` -> `Trainer` -> `compile_steps` -> `train_step`
on `synthetic.random_batch` rows (15% masked, prediction-slot layout). Each step is timed from the
host batch to the updated state being ready, like the reference; the first 3 steps (compile and
warm-up) are left out and the median of the rest is reported. Every row is full length (with
--packed, of several records), so tokens/s = batch * seq / median step time, the reference's
formula.

Dropout: by default the reference's for --arch bert (0.1 on hidden states and on the attention
probabilities, FlaxBert's hidden_dropout_prob and attention_probs_dropout_prob), so that --compare
times equal work; configs/modernbert_base.py's (none) for --arch modernbert; no attention dropout
with --attention_impl cudnn (the fused kernel has none). --arch modernbert
takes the rest of its model section and its mask rate (30%) from that config too.

MFU: model FLOPs per token (mlm_jax.model.model_flops_per_token) x tokens/s over a peak: on GPU/TPU
the dense bf16 peak of the device kind (mlm_jax.metrics' table), on CPU the fp32 rate of a matmul
measured here; --peak_gflops overrides.

Process settings: the benchmark starts like the CLI, through `mlm_jax.launch` (allocator and XLA
settings, see docs/performance.md); `--no_launch` (or MLM_JAX_NO_LAUNCH=1) measures a plain process.
With --compare the reference runs in a plain process unless `--reference_launch` gives it the same
settings.

Last line: `RESULT tokens_per_s=... step_ms=... mfu=...` (with --compare: `RESULT ratio=...`).
"""
import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)  # run as a script from anywhere

from mlm_jax import launch  # noqa: E402  (no jax import: it may re-exec the interpreter first)

COMPILE_STEPS = 3  # as the reference: the first steps (compile, warm-up) are not in the median
REFERENCE_DROPOUT = 0.1  # FlaxBert's hidden_dropout_prob and attention_probs_dropout_prob
_RESULT = re.compile(r'^RESULT tokens_per_s=([0-9.]+)', re.M)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  for name, default in [('layers', 3), ('hidden', 192), ('heads', 4), ('intermediate', 768),
                        ('vocab', 8192), ('seq', 128), ('batch', 32), ('steps', 20)]:
    p.add_argument(f'--{name}', type=int, default=default)  # defaults: the reference's
  p.add_argument('--arch', choices=('bert', 'modernbert'), default='bert',
                 help="model.arch; 'modernbert' as configs/modernbert_base.py (pre-LN, GeGLU, ...)")
  p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                 help='compute dtype (params and optimizer state stay float32)')
  p.add_argument('--attention_impl', choices=('auto', 'xla', 'cudnn'), default='auto',
                 help='model.attention_impl')
  p.add_argument('--packed', type=int, default=0, metavar='K',
                 help='rows of K packed records each (segment ids 1..K, positions restarting); '
                      '0: one record per row')
  p.add_argument('--accum', type=int, default=1, help='train.grad_accum_steps')
  p.add_argument('--remat', choices=('none', 'full', 'save_dots'), default='none',
                 help='model.remat_policy')
  p.add_argument('--scan', action=argparse.BooleanOptionalAction, default=None,
                 help='model.scan_layers (default: the config default)')
  p.add_argument('--dropout', type=float, default=None,
                 help='model.dropout (default: 0.1 as the reference; modernbert: 0)')
  p.add_argument('--attention_dropout', type=float, default=None,
                 help='model.attention_dropout (default: 0.1 as the reference, whose FlaxBert '
                      'drops attention probabilities; modernbert and --attention_impl cudnn: 0)')
  p.add_argument('--peak_gflops', type=float, default=0.0,
                 help='MFU denominator; 0 = measure fp32 matmul GFLOP/s here (cpu_peak.py method)')
  p.add_argument('--no_launch', action='store_true', help='skip mlm_jax.launch process settings')
  p.add_argument('--compare', action='store_true', help='alternate with the reference, print ratio')
  p.add_argument('--rounds', type=int, default=3, help='--compare: A B rounds (>= 3)')
  p.add_argument('--reference_dir', default=os.path.join(_REPO, '..', 'shared', 'bench'),
                 help='folder with hf_flax_mlm.py')
  p.add_argument('--reference_python', default=os.environ.get(
      'MLM_JAX_PEERS_PYTHON', os.path.join(_REPO, '..', 'venv-peers', 'bin', 'python')),
                 help="interpreter with 'transformers<5' and flax (see shared/bench/README.md)")
  p.add_argument('--reference_launch', action='store_true',
                 help="--compare: give the reference our launcher's process settings too")
  args = p.parse_args(argv)
  if args.steps <= COMPILE_STEPS:
    p.error(f'--steps must be more than the {COMPILE_STEPS} excluded compile steps')
  if args.packed < 0 or args.packed * 4 > args.seq:
    p.error('--packed K needs 0 <= K and at least 4 tokens per record')
  default_rate = REFERENCE_DROPOUT if args.arch == 'bert' else 0.0
  args.dropout = default_rate if args.dropout is None else args.dropout
  if args.attention_impl == 'cudnn':  # the fused kernel has no dropout
    if args.attention_dropout:
      p.error("--attention_impl cudnn: cuDNN's kernel has no attention dropout "
              '(--attention_dropout 0)')
    args.attention_dropout = 0.0
  elif args.attention_dropout is None:
    args.attention_dropout = default_rate
  return args


# configs/modernbert_base.py's model fields that --arch modernbert takes (the sizes are arguments).
_MODERNBERT_FIELDS = ('arch', 'layer_norm', 'layer_norm_eps', 'init_std', 'local_attention',
                      'global_attn_every_n_layers', 'global_rope_theta', 'local_rope_theta',
                      'scan_layers')


def make_config(args):
  from mlm_jax import config as config_lib
  c = config_lib.base_config()
  c.data.mask_rate = 0.15
  if args.arch == 'modernbert':
    from configs import modernbert_base  # pylint: disable=import-outside-toplevel
    modern = modernbert_base.get_config()
    c.model.update({k: modern.model[k] for k in _MODERNBERT_FIELDS})
    c.data.mask_rate = modern.data.mask_rate
  c.model.update(num_layers=args.layers, hidden_size=args.hidden, num_heads=args.heads,
                 intermediate_size=args.intermediate, vocab_size=args.vocab, max_len=args.seq,
                 dtype=args.dtype, remat_policy=args.remat, dropout=args.dropout,
                 attention_dropout=args.attention_dropout, attention_impl=args.attention_impl)
  if args.scan is not None:
    c.model.scan_layers = args.scan
  c.train.update(batch_size=args.batch, grad_accum_steps=args.accum, steps=max(args.steps, 10),
                 compilation_cache_dir='')
  c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, args.steps)
  config_lib.validate(c)
  return c


def pack(batch: dict, records: int, seed: int) -> dict:
  """`batch` (synthetic.random_batch) as rows of `records` packed records: segment ids 1..records
  at random boundaries (each record at least 2 tokens), positions restarting in each record."""
  b, l = batch['segment_ids'].shape
  rng = np.random.default_rng(seed)
  segment_BL = np.empty((b, l), np.int32)
  positions_BL = np.empty((b, l), np.int32)
  for r in range(b):
    cuts = np.sort(rng.choice(np.arange(1, l // 2), records - 1, replace=False)) * 2
    starts = np.concatenate([[0], cuts])
    lengths = np.diff(np.concatenate([starts, [l]]))
    segment_BL[r] = np.repeat(np.arange(1, records + 1), lengths)
    positions_BL[r] = np.arange(l) - np.repeat(starts, lengths)
  return {**batch, 'segment_ids': segment_BL, 'positions': positions_BL}


def make_batches(args, config, n: int) -> list[dict]:
  from mlm_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from mlm_jax.synthetic import random_batch  # pylint: disable=import-outside-toplevel
  p = config_lib.max_predictions(config)
  out = [random_batch(i, args.batch, args.seq, p, args.vocab, mask_rate=config.data.mask_rate)
         for i in range(n)]
  return [pack(b, args.packed, i) for i, b in enumerate(out)] if args.packed > 1 else out


def peak_flops(args) -> tuple[float, str]:
  """(FLOP/s, what it is): --peak_gflops; the device kind's dense bf16 peak on GPU/TPU; else a
  measured fp32 matmul."""
  import jax  # pylint: disable=import-outside-toplevel
  from mlm_jax import metrics  # pylint: disable=import-outside-toplevel
  if args.peak_gflops:
    return args.peak_gflops * 1e9, 'given'
  if jax.default_backend() != 'cpu':
    return metrics.peak_flops_per_device(0.0) * jax.device_count(), 'device bf16 peak'
  return matmul_peak_flops(), 'measured fp32 matmul'



def matmul_peak_flops(n=2048, reps=20) -> float:
  """fp32 FLOP/s of a jitted n x n matmul, median of `reps` (shared/bench/cpu_peak.py's method)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  a, b = (jnp.asarray(np.random.default_rng(i).standard_normal((n, n), dtype=np.float32))
          for i in (0, 1))
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    dot(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n**3 / statistics.median(times)


def peak_memory() -> str:
  """Peak RSS of this process; device memory stats where the backend has them (GPU/TPU)."""
  import jax
  rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
  out = f'peak_rss_mb={rss_mb:.0f}'
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    out += f" device_peak_mb={stats['peak_bytes_in_use'] / 2**20:.0f}"
  if 'bytes_limit' in stats:
    out += f" device_limit_mb={stats['bytes_limit'] / 2**20:.0f}"
  return out


def run_ours(args) -> float:
  import jax
  from mlm_jax import model as model_lib
  from mlm_jax import train

  config = make_config(args)
  peak, peak_kind = peak_flops(args)
  trainer = train.Trainer(config, workdir=None)
  state = trainer.init_state()
  batches = make_batches(args, config, 4)
  tic = time.perf_counter()
  trainer.compile_steps(batches[0])
  compile_s = time.perf_counter() - tic
  mem = trainer.compiled_train_step.memory_analysis()

  times = []
  for i in range(args.steps):
    t0 = time.perf_counter()
    state, metrics = trainer.train_step(state, batches[i % len(batches)])
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  steady = times[COMPILE_STEPS:]
  step_s = statistics.median(steady)
  tokens_per_s = args.batch * args.seq / step_s
  flops_per_token = model_lib.model_flops_per_token(
      trainer.model_cfg, trainer.param_counts['encoder'], config.data.mask_rate)
  mfu = tokens_per_s * flops_per_token / peak
  loss = float(metrics['loss_sum']) / float(metrics['weight_sum'])

  print(f'jax {jax.__version__} devices={jax.devices()} arch={args.arch} '
        f'dtype={trainer.model_cfg.dtype} attention_impl={args.attention_impl} accum={args.accum} '
        f'remat={args.remat} scan={trainer.model_cfg.scan_layers} launch={launch.describe()}')
  print(f'dropout={args.dropout} attention_dropout={args.attention_dropout} '
        f'mask_rate={config.data.mask_rate} packed_records_per_row={max(args.packed, 1)}')
  print(f"PARAMS total={trainer.param_counts['total']} encoder={trainer.param_counts['encoder']} "
        f'model_flops_per_token={flops_per_token:.4g}')
  print(f'compile_s={compile_s:.2f} first_step_s={times[0]:.2f} steady_steps={len(steady)} '
        f'median_ms={step_s * 1e3:.1f} min_ms={min(steady) * 1e3:.1f} '
        f'max_ms={max(steady) * 1e3:.1f} final_loss={loss:.3f}')
  if mem is not None:
    print(f'compiled_memory_mb temp={mem.temp_size_in_bytes / 2**20:.0f} '
          f'args={mem.argument_size_in_bytes / 2**20:.0f} '
          f'out={mem.output_size_in_bytes / 2**20:.0f} alias={mem.alias_size_in_bytes / 2**20:.0f}')
  print(f'{peak_memory()} peak_gflops={peak / 1e9:.1f} ({peak_kind})')
  print(f'RESULT tokens_per_s={tokens_per_s:.1f} step_ms={step_s * 1e3:.1f} mfu={mfu:.3f}')
  return tokens_per_s


_SIZE_ARGS = ('layers', 'hidden', 'heads', 'intermediate', 'vocab', 'seq', 'batch', 'steps')


def _run_child(cmd, env, cwd) -> float:
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
  found = _RESULT.findall(proc.stdout)
  if proc.returncode or not found:
    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
    raise SystemExit(f'benchmark: {cmd[1]} failed (exit {proc.returncode})')
  details = ' '.join(re.findall(r'(?:compile_s|first_step_s|peak_rss_mb|mfu)=[0-9.]+', proc.stdout))
  print(f'  {os.path.basename(cmd[1])}: {float(found[-1]):.1f} tokens/s {details} '
        f'({time.perf_counter() - t0:.0f}s wall)', flush=True)
  return float(found[-1])


def compare(args, argv) -> None:
  ref_script = os.path.join(args.reference_dir, 'hf_flax_mlm.py')
  if not os.path.exists(ref_script):
    print(f'benchmark: no reference at {ref_script} (set --reference_dir); skipping the comparison')
    return
  if not os.path.exists(args.reference_python):
    print(f'benchmark: no reference interpreter at {args.reference_python} (see '
          f'shared/bench/README.md, or set --reference_python); skipping the comparison')
    return
  sizes = [x for name in _SIZE_ARGS for x in (f'--{name}', str(getattr(args, name)))]
  ref_cmd = [args.reference_python, ref_script, *sizes]
  if args.arch != 'bert':
    raise SystemExit('benchmark: --compare times the reference BERT; use --arch bert')
  print(f'dropout: reference {REFERENCE_DROPOUT} on hidden states and attention probabilities; '
        f'ours dropout={args.dropout} attention_dropout={args.attention_dropout}'
        + ('' if args.dropout == args.attention_dropout == REFERENCE_DROPOUT
           else ' (not the same work as the reference)'), flush=True)
  own_argv = [a for a in argv if a not in ('--compare', '--reference_launch')]
  ours_cmd = [sys.executable, os.path.abspath(__file__), *own_argv]
  plain = launch.plain_env(os.environ)  # whatever this process inherited from a launcher: gone
  ref_env = launch.launch_env(plain) if args.reference_launch else plain
  ref_env = {**ref_env, launch.GUARD: '1'}  # never re-exec'd (it is not ours)
  ours, ref = [], []
  for r in range(max(args.rounds, 1)):
    print(f'round {r + 1}/{args.rounds}', flush=True)
    ref.append(_run_child(ref_cmd, ref_env, args.reference_dir))
    ours.append(_run_child(ours_cmd, plain, _REPO))
  ratios = [o / f for o, f in zip(ours, ref)]
  print(f"reference ({'with' if args.reference_launch else 'without'} launch settings) tokens/s: "
        f"{', '.join(f'{x:.0f}' for x in ref)}")
  print(f"ours ({'without' if args.no_launch else 'with'} launch settings) tokens/s: "
        f"{', '.join(f'{x:.0f}' for x in ours)}")
  print(f"ratios: {', '.join(f'{x:.2f}' for x in ratios)}")
  print(f'RESULT ratio={statistics.median(ratios):.2f} ours_tokens_per_s={statistics.median(ours):.1f} '
        f'reference_tokens_per_s={statistics.median(ref):.1f}')


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.compare:
    compare(args, argv)
    return
  if not args.no_launch:
    launch.relaunch_if_needed()  # before jax is imported: the settings are read at start-up
  run_ours(args)


if __name__ == '__main__':
  main()
