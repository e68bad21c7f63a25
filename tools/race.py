r"""Time to quality: the Hugging Face Flax reference against mlm_jax, on this machine and the same text.

  python tools/race.py [--budget_s 300] [--train_text FILE] [--heldout_text FILE] \
      [--contenders ref,bert,modern] [--workdir /tmp/mlm_jax_race]

Contenders, each given the same wall-clock budget, one after another:
- `ref`: shared/bench/hf_flax_mlm.py with its own recipe (FlaxBertForMaskedLM, AdamW b2=0.98, lr
  3e-4, linear warmup (10% of its steps) and linear decay), fed the text grouped into rows as
  run_mlm_flax's group_texts does; run by tools/race_reference.py in the reference's interpreter.
- `bert`: ours, `configs/mini_bert.py` (the BERT recipe), as a user runs it: `python -m mlm_jax.main`.
- `modern`: ours, `configs/modernbert_base.py:mini` (the modern recipe: ModernBERT blocks, 30%
  masking, warmup-stable-decay, update clipping, no dropout; bf16 compute where the CPU has bf16
  matmul instructions, AVX512-BF16 or AMX), through the same CLI.
All three have the Mini-BERT shape: L3/H192/A4 with the same feed-forward parameters, the same 8K
WordPiece vocabulary trained on the training text, sequences of 128, 32 sequences per step. Each recipe's schedule length is set
from its step time, measured in a short calibration run first, so that it ends with the budget.

Scoring: tools/race_score.py, one scorer for all: the held-out text, one line per row, with fixed
15% masks, mean cross-entropy at the masked tokens. The reference is scored in its own process
every --score_every_s of training (the clock paused); ours save a checkpoint at that interval
(`checkpoint.every_seconds`) and are scored afterwards; a checkpoint's time is when its save began
(orbax's init_timestamp). Seconds count from each process's launch: start-up and compilation count.

Default text: ../shared/data/wikitext-2-raw/wiki.valid.raw, its last 10% of articles held out;
with --heldout_text, all of --train_text trains. Writes results.json and race.png (loss against
seconds) into --workdir; the last line is
`RESULT ref_final_loss=... ours_time_to_ref_loss_s=... speedup=...` (ours: the faster recipe; the
reference's time is that of its final score).
"""
import argparse
import glob
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time

import numpy as np

_TOOLS = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_TOOLS)
sys.path[:0] = [_REPO, _TOOLS]

import race_score  # noqa: E402

_SHARED = os.path.join(_REPO, '..', 'shared')
_MODEL = dict(num_layers=3, hidden_size=192, num_heads=4, intermediate_size=768)
_CONFIGS = {'bert': 'configs/mini_bert.py', 'modern': 'configs/modernbert_base.py:mini'}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--train_text', default=os.path.join(_SHARED, 'data', 'wikitext-2-raw',
                                                      'wiki.valid.raw'))
  p.add_argument('--heldout_text', default='', help="'' = the train text's last 10%% of articles")
  p.add_argument('--budget_s', type=float, default=300.0, help='wall-clock seconds per contender')
  p.add_argument('--score_every_s', type=float, default=0.0, help='0 = budget / 20')
  p.add_argument('--contenders', default='ref,bert,modern')
  p.add_argument('--workdir', default='/tmp/mlm_jax_race')
  p.add_argument('--vocab', type=int, default=8192)
  p.add_argument('--seq', type=int, default=128)
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--reference_dir', default=os.path.join(_SHARED, 'bench'))
  p.add_argument('--reference_python', default=os.environ.get(
      'MLM_JAX_PEERS_PYTHON', os.path.join(_REPO, '..', 'venv-peers', 'bin', 'python')))
  p.add_argument('--calibrate_steps', type=int, default=30,
                 help='steps of the calibration run that times each recipe')
  args = p.parse_args(argv)
  args.score_every_s = args.score_every_s or args.budget_s / 20
  return args


# ------------------------------------------------------------------------------------- the text


def split_articles(lines, heldout_fraction=0.1):
  """WikiText lines -> (train lines, held-out lines), cut at the article heading (` = Title = `)
  nearest the fraction, so no article straddles the two."""
  starts = [i for i, line in enumerate(lines) if re.match(r'^ = [^=].* = $', line.rstrip('\n'))]
  cut = int(len(lines) * (1 - heldout_fraction))
  cut = min(starts, key=lambda i: abs(i - cut)) if starts else cut
  return lines[:cut], lines[cut:]


def prepare(args):
  """train.txt, heldout.txt, vocab.txt, the reference's rows and the held-out set, in workdir."""
  from mlm_jax.data.tokenizers import WordPieceTokenizer
  from tools import train_tokenizer
  os.makedirs(args.workdir, exist_ok=True)
  with open(args.train_text, encoding='utf-8') as f:
    lines = f.readlines()
  if args.heldout_text:
    train, heldout = lines, open(args.heldout_text, encoding='utf-8').readlines()
  else:
    train, heldout = split_articles(lines)
  paths = {k: os.path.join(args.workdir, f'{k}.txt') for k in ('train', 'heldout')}
  for key, text in (('train', train), ('heldout', heldout)):
    with open(paths[key], 'w', encoding='utf-8') as f:
      f.writelines(text)
  vocab = os.path.join(args.workdir, 'vocab.txt')
  train_tokenizer.train([paths['train']], args.vocab, vocab)
  tok = WordPieceTokenizer(vocab)
  if tok.vocab_size != args.vocab:
    raise SystemExit(f'race: the text gave a vocabulary of {tok.vocab_size}, not {args.vocab}; '
                     'pass --vocab')
  assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id) == (
      race_score.PAD, race_score.CLS, race_score.SEP, race_score.MASK)
  # The reference's rows: every line [CLS] ids [SEP], concatenated, cut into seq-token rows.
  flat = np.concatenate([np.array([tok.cls_id, *ids, tok.sep_id], np.int32)
                         for ids in tok.encode_batch([l for l in train if l.strip()])])
  rows = flat[:len(flat) // args.seq * args.seq].reshape(-1, args.seq)
  np.save(os.path.join(args.workdir, 'ref_rows.npy'), rows)
  ids_NL, attention_NL = race_score.rows_per_line(
      tok.encode_batch([l for l in heldout if l.strip()]), args.seq)
  held = race_score.make_heldout(ids_NL, attention_NL, args.vocab, seed=0)
  held.save(os.path.join(args.workdir, 'heldout.npz'))
  print(f'text: {len(train)} train lines ({len(flat)} tokens, {len(rows)} reference rows), '
        f'{len(ids_NL)} held-out rows, {int(held.weights_NP.sum())} held-out masked tokens',
        flush=True)
  return paths, vocab


# ------------------------------------------------------------------------------- the reference


def run_reference(args, budget_s, steps, score_every_s, out=''):
  cmd = [args.reference_python, os.path.join(_TOOLS, 'race_reference.py'),
         '--reference_dir', args.reference_dir, '--rows', os.path.join(args.workdir, 'ref_rows.npy'),
         '--heldout', os.path.join(args.workdir, 'heldout.npz'), '--budget_s', str(budget_s),
         '--score_every_s', str(score_every_s), '--steps', str(steps),
         '--warmup_steps', str(max(1, steps // 10)), '--batch', str(args.batch),
         '--vocab', str(args.vocab), '--out', out,
         '--model', ','.join(str(_MODEL[k]) for k in ('num_layers', 'hidden_size', 'num_heads',
                                                      'intermediate_size'))]
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'PYTHONPATH')}
  proc = subprocess.run(cmd + ['--t0', repr(time.time())], env=env, capture_output=True,
                        text=True)
  m = re.search(r'^STEP_S=([0-9.]+)', proc.stdout, re.M)
  if proc.returncode or not m:
    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
    raise SystemExit(f'race: the reference failed (exit {proc.returncode})')
  return float(m.group(1))


# --------------------------------------------------------------------------------------- ours


def _our_overrides(args, name, paths, vocab, steps):
  o = {'data.train_files': paths['train'], 'data.eval_files': paths['heldout'],
       'data.vocab_path': vocab, 'data.text_unit': 'line', 'train.steps': steps,
       'train.batch_size': args.batch, 'train.grad_accum_steps': 1, 'train.eval_every': 0,
       'train.log_every': 5, 'train.progress_bar': False, 'train.compilation_cache_dir': '',
       'checkpoint.every': 0, 'checkpoint.every_seconds': args.score_every_s,
       'checkpoint.keep': 1000, 'checkpoint.keep_best': 0, 'model.vocab_size': args.vocab,
       'model.max_len': args.seq, 'optimizer.warmup_steps': max(1, steps // 10)}
  if name == 'bert':
    o.update({f'model.{k}': v for k, v in _MODEL.items()})
  elif bf16_matmuls():  # the modern recipe computes in bf16 where the CPU multiplies in bf16
    o['model.dtype'] = 'bfloat16'
  return o


def bf16_matmuls() -> bool:
  """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX): bf16 pays there."""
  try:
    flags = open('/proc/cpuinfo').read()
  except OSError:
    return False
  return bool(re.search(r'\b(avx512_bf16|amx_bf16)\b', flags))


def run_ours(args, name, paths, vocab, steps, workdir, budget_s, **extra):
  """The CLI, stopped with SIGTERM (a clean stop: it saves) if it outlives the budget (None: no
  limit)."""
  overrides = {**_our_overrides(args, name, paths, vocab, steps), **extra}
  cmd = [sys.executable, '-m', 'mlm_jax.main', f'--config={os.path.join(_REPO, _CONFIGS[name])}',
         f'--workdir={workdir}'] + [f'--config.{k}={v}' for k, v in overrides.items()]
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  t0 = time.time()
  log = open(os.path.join(args.workdir, f'{name}.log'), 'w')
  proc = subprocess.Popen(cmd, cwd=_REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
  try:
    proc.wait(timeout=budget_s)
  except subprocess.TimeoutExpired:
    proc.send_signal(signal.SIGTERM)
    proc.wait()
  if proc.returncode not in (0, -signal.SIGTERM):
    raise SystemExit(f'race: {name} failed (exit {proc.returncode}); see {log.name}')
  return t0


def step_seconds(workdir) -> float:
  """Median train/step_time of a run's logged windows after the first (compile)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  times = [r['train/step_time'] for r in map(json.loads, open(path)) if 'train/step_time' in r]
  if not times:
    raise SystemExit(f'race: the calibration run logged no step time ({path}); raise '
                     '--calibrate_steps')
  return statistics.median(times[1:] or times)


def score_ours(workdir, t0, heldout, budget_s):
  """[(t, step, loss)] of every checkpoint saved within the budget."""
  import jax
  import jax.numpy as jnp
  from absl import logging
  from flax import nnx
  from mlm_jax import rundir
  logging.set_verbosity(logging.ERROR)  # orbax's read-only notes, once per checkpoint
  points, forward = [], None
  for meta_path in glob.glob(os.path.join(workdir, 'checkpoints', '*', '_CHECKPOINT_METADATA')):
    step_dir = os.path.dirname(meta_path)
    t = json.load(open(meta_path))['init_timestamp_nsecs'] / 1e9 - t0
    if t > budget_s:
      continue
    loaded = rundir.load(step_dir)
    model = rundir.make_model(rundir.model_config(loaded.config), loaded.params)
    graphdef, state = nnx.split(model)
    if forward is None:
      @jax.jit
      def forward(state, ids_BL, attention_BL, positions_BP):
        b, l = ids_BL.shape
        batch = {'input_ids': ids_BL, 'segment_ids': attention_BL, 'token_type_ids': jnp.zeros_like(ids_BL),
                 'positions': jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l)),
                 'mlm_positions': positions_BP}
        return nnx.merge(graphdef, state)(batch)
    loss = race_score.score(lambda i, a, p, state=state: forward(state, i, a, p), heldout)
    points.append({'t': round(t, 2), 'step': loaded.step, 'loss': loss})
  return sorted(points, key=lambda r: r['t'])


# ------------------------------------------------------------------------------------ results


def time_to(points, target):
  """First scored time at which the loss is at or below target (None if never)."""
  return next((p['t'] for p in points if p['loss'] <= target), None)


def plot(curves, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, points in curves.items():
    ax.plot([p['t'] for p in points], [p['loss'] for p in points], marker='o', label=name)
  ax.set_xlabel('seconds since launch (scoring excluded)')
  ax.set_ylabel('held-out MLM loss (fixed 15% masks)')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None):
  args = parse_args(argv)
  names = args.contenders.split(',')
  if 'ref' in names and not os.path.exists(args.reference_python):
    raise SystemExit(f'race: no reference interpreter at {args.reference_python} '
                     '(shared/bench/README.md; or --reference_python)')
  paths, vocab = prepare(args)
  heldout = race_score.Heldout.load(os.path.join(args.workdir, 'heldout.npz'))
  curves, steps = {}, {}
  for name in names:
    print(f'{name}: calibrating ({args.calibrate_steps} steps)', flush=True)
    if name == 'ref':
      step_s = run_reference(args, 1e9, args.calibrate_steps, 0.0)
    else:
      cal = os.path.join(args.workdir, f'{name}_calibration')
      subprocess.run(['rm', '-rf', cal], check=True)
      run_ours(args, name, paths, vocab, args.calibrate_steps, cal, None,
               **{'train.log_every': 5, 'checkpoint.every_seconds': 0})
      step_s = step_seconds(cal)
    # The schedule ends with the budget: the steps that fit after start-up (~15% of a short budget).
    steps[name] = max(20, int(0.85 * args.budget_s / step_s))
    print(f'{name}: {step_s * 1e3:.0f} ms/step -> schedule of {steps[name]} steps', flush=True)
    if name == 'ref':
      out = os.path.join(args.workdir, 'ref_scores.jsonl')
      run_reference(args, args.budget_s, steps[name], args.score_every_s, out)
      curves[name] = [json.loads(line) for line in open(out)]
    else:
      run_dir = os.path.join(args.workdir, name)
      subprocess.run(['rm', '-rf', run_dir], check=True)
      t0 = run_ours(args, name, paths, vocab, steps[name], run_dir, args.budget_s)
      curves[name] = score_ours(run_dir, t0, heldout, args.budget_s)
    for p in curves[name]:
      print(f"  {name} t={p['t']:7.1f}s step={p['step']:5d} heldout_loss={p['loss']:.4f}",
            flush=True)
  results = {'budget_s': args.budget_s, 'steps': steps, 'curves': curves}
  plot(curves, os.path.join(args.workdir, 'race.png'))
  line = ''
  if 'ref' in curves and curves['ref']:
    target, ref_t = curves['ref'][-1]['loss'], curves['ref'][-1]['t']
    ours = {n: time_to(curves[n], target) for n in names if n != 'ref'}
    for n, t in ours.items():
      print(f'{n}: reaches the reference final loss {target:.4f} at '
            f"{'never' if t is None else f'{t:.1f} s'}; final loss {curves[n][-1]['loss']:.4f}")
    reached = {n: t for n, t in ours.items() if t is not None}
    best = min(reached, key=reached.get) if reached else None
    results.update(ref_final_loss=target, ref_time_s=ref_t, ours_time_to_ref_loss_s=ours)
    if best:
      line = (f'RESULT ref_final_loss={target:.4f} ours_time_to_ref_loss_s={reached[best]:.1f} '
              f'speedup={ref_t / reached[best]:.2f} ours={best}')
    else:
      line = f'RESULT ref_final_loss={target:.4f} ours_time_to_ref_loss_s=inf speedup=0.00'
  json.dump(results, open(os.path.join(args.workdir, 'results.json'), 'w'), indent=1)
  print(f"plot: {os.path.join(args.workdir, 'race.png')}")
  if line:
    print(line)


if __name__ == '__main__':
  main()
