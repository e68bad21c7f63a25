r"""Where one train step's time goes: a jax.profiler trace of a few steps, summed per XLA op.

  python tools/profile_step.py --layers 4 --hidden 512 --heads 8 --intermediate 2048 \
      --vocab 30522 --seq 128 --batch 16 [--steps 3] [--top 30] [--dtype bfloat16] ...

Same arguments and the same real train step as tools/benchmark.py (synthetic batches, launcher
settings). After the compile and warm-up steps it traces `--steps` steps, then prints the ops that
took longest (ms per step) with their output shape and the JAX operation they came from (the HLO
metadata), and the total per kind of op: on CPU, `ynn_fusion` = matmuls (with whatever elementwise
work XLA fused into them), `*_fusion` = elementwise/reductions, `wrapped_scatter` = gathers'
gradients. The trace stays in --trace_dir for TensorBoard/Perfetto (docs/performance.md).

`--matmuls` instead lists every matmul of the compiled step (no tracing): forward or backward, the
JAX operation, operand and result dtypes and shapes, how many. In bfloat16 compute every operand
should be bf16 (XLA:CPU computes a dot in fp32 when its operands or result are fp32).
"""
import argparse
import collections
import dataclasses
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


_COMPUTATION = re.compile(r'^(?:ENTRY )?%(\S+) .*\{$')
_VALUE = re.compile(r'^\s*(?:ROOT )?%(\S+) = (\w+)(\[[^\]]*\])')
# A dot, or a library matmul's custom-call (oneDNN on CPU, cuBLAS on GPU; its result may be a tuple
# with a workspace: the first element is the product).
_MATMUL = re.compile(
    r'^\s*(?:ROOT )?%(\S+) = \(?(\w+\[[^\]]*\]).*? (dot|custom-call)\(([^)]*)\)(.*)$')
_LIBRARY_MATMUL = re.compile(r'custom_call_target="[^"]*(?:matmul|gemm)[^"]*"', re.I)


@dataclasses.dataclass(frozen=True)
class Matmul:
  """One matmul of an optimized HLO module: a `dot`, or a library matmul's custom-call."""
  direction: str  # 'fwd', or 'bwd' (from the transpose of a JAX op: autodiff or a custom_vjp)
  source: str  # the JAX operation (HLO metadata op_name, jit and autodiff wrappers removed)
  operands: tuple[str, ...]  # dtype[shape] of each operand
  result: str  # dtype[shape]

  @property
  def operand_dtypes(self) -> tuple[str, ...]:
    return tuple(o.split('[')[0] for o in self.operands)


def _source(op_name: str) -> tuple[str, str]:
  """(direction, operation) of an HLO op_name such as
  'jit(train_step)/transpose(jvp(vmap(BTNH,BSNH->BNTS)))/dot_general'."""
  parts = op_name.split('/')
  direction = 'bwd' if any(p.startswith('transpose(') for p in parts) else 'fwd'
  core = [re.sub(r'^(?:transpose|jvp|jit|vmap|checkpoint|remat|while|body|cond)\((.*)\)$', r'\1', p)
          for p in parts[1:]]
  for _ in range(4):  # nested wrappers: transpose(jvp(vmap(...)))
    core = [re.sub(r'^(?:transpose|jvp|vmap)\((.*)\)$', r'\1', p) for p in core]
  return direction, '/'.join(p for p in core if p) or '(inserted by XLA)'


def matmuls(hlo_text: str) -> list[Matmul]:
  """Every matmul of an optimized HLO module, with its operands' dtypes and shapes (read from the
  instruction or parameter that defines each operand, in the same computation)."""
  found, values, pending = [], {}, []

  def flush():
    for name, result, args, rest in pending:
      operands = tuple(values.get(a, '?') for a in re.findall(r'%([\w.\-]+)', args))
      op = re.search(r'op_name="([^"]*)"', rest)
      direction, source = _source(op.group(1)) if op else ('?', '(no metadata)')
      found.append(Matmul(direction, source, operands, result))
    pending.clear()

  for line in hlo_text.splitlines():
    if _COMPUTATION.match(line):
      flush()
      values = {}
      continue
    v = _VALUE.match(line)
    if v:
      values[v.group(1)] = v.group(2) + v.group(3)
    m = _MATMUL.match(line)
    if m and (m.group(3) == 'dot' or _LIBRARY_MATMUL.search(m.group(5))):
      pending.append((m.group(1), m.group(2), m.group(4), m.group(5)))
  flush()
  return found


def matmul_report(found: list[Matmul]) -> str:
  rows = collections.Counter(found)
  lines = [f'{"n":>3} {"dir":3} {"operands":48} {"result":22} from']
  for mm, n in sorted(rows.items(), key=lambda kv: (kv[0].direction != 'fwd', kv[0].source,
                                                    kv[0].operands)):
    lines.append(f'{n:3d} {mm.direction:3} {" x ".join(mm.operands):48} {mm.result:22} '
                 f'{mm.source[-70:]}')
  by_dtypes = collections.Counter((m.direction, ','.join(m.operand_dtypes)) for m in found)
  lines.append('matmuls by direction and operand dtypes: ' + ', '.join(
      f'{d} {t}: {n}' for (d, t), n in sorted(by_dtypes.items())))
  return '\n'.join(lines)


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
  parser.add_argument('--matmuls', action='store_true',
                      help="list the compiled step's matmuls and their dtypes instead of tracing")
  own, rest = parser.parse_known_args(argv)
  steps, top = own.steps, own.top
  trace_dir = own.trace_dir or tempfile.mkdtemp(prefix='mlm_jax_profile_')
  # The model/batch arguments are the benchmark's; its --steps is not used here.
  args = benchmark.parse_args(rest + ['--steps', str(benchmark.COMPILE_STEPS + 1)])
  if not args.no_launch:
    launch.relaunch_if_needed()

  import jax  # pylint: disable=import-outside-toplevel
  from mlm_jax import train  # pylint: disable=import-outside-toplevel

  config = benchmark.make_config(args)
  trainer = train.Trainer(config)
  batches = benchmark.make_batches(args, config, steps)
  trainer.compile_steps(batches[0])
  if own.matmuls:
    print(matmul_report(matmuls(trainer.compiled_train_step.as_text())))
    return
  state = trainer.init_state()
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
