r"""Where one train step's time goes: a jax.profiler trace of a few steps, summed per XLA op.

  python tools/profile_step.py --layers 4 --hidden 512 --heads 8 --intermediate 2048 \
      --vocab 30522 --seq 128 --batch 16 [--steps 3] [--top 30] [--dtype bfloat16] ...

Same arguments and the same real train step as tools/benchmark.py (synthetic batches, launcher
settings). After the compile and warm-up steps it traces `--steps` steps, then prints the ops that
took longest (ms per step) with their output shape and the JAX operation they came from (the HLO
metadata), and the total per kind of op: on CPU, `ynn_fusion` = matmuls (with whatever elementwise
work XLA fused into them), `*_fusion` = elementwise/reductions, `wrapped_scatter` = gathers'
gradients. The trace stays in --trace_dir for TensorBoard/Perfetto (docs/performance.md).
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

_TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_TOOLS))

from tools import benchmark  # noqa: E402
from mlm_jax import launch  # noqa: E402

_INSTRUCTION = re.compile(r'^\s*%(\S+) = (\S+(?: \S+)*?) (?:fusion|custom-call|copy|transpose|'
                          r'reduce|scatter|gather|dot|sort)\(')


def hlo_index(hlo_text: str) -> dict[str, tuple[str, str]]:
  """HLO instruction name -> (output shape, JAX op_name from its metadata)."""
  index = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      op = re.search(r'op_name="([^"]*)"', line)
      index[m.group(1)] = (m.group(2), op.group(1) if op else '')
  return index


def op_times(trace_dir: str, steps: int) -> collections.Counter:
  """ms per step for each traced event name (complete events only)."""
  files = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True)
  if not files:
    raise SystemExit(f'profile_step: no trace written under {trace_dir}')
  events = json.load(gzip.open(max(files, key=os.path.getmtime)))['traceEvents']
  total = collections.Counter()
  for e in events:
    if e.get('ph') == 'X':
      total[e['name']] += e['dur'] / 1e3 / steps
  return total


def kind(name: str) -> str:
  return 'matmul (ynn_fusion)' if name.startswith('ynn_fusion') else re.sub(r'\.\d+$', '', name)


def report(times: collections.Counter, index: dict, top: int) -> str:
  ops = [(ms, name) for name, ms in times.items() if name in index]
  ops.sort(reverse=True)
  step_ms = times.get('ThunkExecutor::Execute (wait for completion)', sum(ms for ms, _ in ops))
  lines = [f'step (device time): {step_ms:.1f} ms; XLA ops: {sum(ms for ms, _ in ops):.1f} ms',
           f'{"ms/step":>9}  {"op":30} {"shape":44} from']
  for ms, name in ops[:top]:
    shape, op = index[name]
    lines.append(f'{ms:9.1f}  {name:30} {shape[:44]:44} {op[-80:] or "(inserted by XLA)"}')
  by_kind = collections.Counter()
  for ms, name in ops:
    by_kind[kind(name)] += ms
  lines.append('per kind of op (ms/step, share of the ops):')
  whole = sum(by_kind.values()) or 1.0
  for k, ms in by_kind.most_common(12):
    lines.append(f'{ms:9.1f}  {100 * ms / whole:5.1f}%  {k}')
  return '\n'.join(lines)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(add_help=False)
  parser.add_argument('--steps', type=int, default=3, help='steps to trace (after warm-up)')
  parser.add_argument('--top', type=int, default=30, help='ops to list')
  parser.add_argument('--trace_dir', default='', help='where the trace goes (default: a temp dir)')
  own, rest = parser.parse_known_args(argv)
  steps, top = own.steps, own.top
  trace_dir = own.trace_dir or tempfile.mkdtemp(prefix='mlm_jax_profile_')
  # The model/batch arguments are the benchmark's; its --steps is not used here.
  args = benchmark.parse_args(rest + ['--steps', str(benchmark.COMPILE_STEPS + 1)])
  if not args.no_launch:
    launch.relaunch_if_needed()

  import jax  # pylint: disable=import-outside-toplevel
  from mlm_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from mlm_jax import train  # pylint: disable=import-outside-toplevel
  from mlm_jax.synthetic import random_batch  # pylint: disable=import-outside-toplevel

  config = benchmark.make_config(args)
  trainer = train.Trainer(config)
  state = trainer.init_state()
  p = config_lib.max_predictions(config)
  batches = [random_batch(i, args.batch, args.seq, p, args.vocab) for i in range(steps)]
  trainer.compile_steps(batches[0])
  for b in batches[:benchmark.COMPILE_STEPS]:  # compile and warm up outside the trace
    state, _ = trainer.train_step(state, b)
  jax.block_until_ready(state)
  with jax.profiler.trace(trace_dir):
    for b in batches:
      state, metrics = trainer.train_step(state, b)
      jax.block_until_ready((state, metrics))
  hlo = trainer.compiled_train_step
  print(report(op_times(trace_dir, steps), hlo_index(hlo.as_text()), top))
  print(f'trace: {trace_dir}')


if __name__ == '__main__':
  main()
