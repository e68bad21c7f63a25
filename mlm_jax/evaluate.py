"""MLM loss, accuracy and perplexity of a trained checkpoint on any files in the run's input format.

  python -m mlm_jax.evaluate --checkpoint DIR/checkpoints/STEP --files 'held_out/*.txt'
  python -m mlm_jax.evaluate --workdir DIR --files 'held_out/*.txt' [--step N]

A checkpoint step directory is enough on its own (it holds its config and tokenizer), wherever it
was copied to; --workdir is a run directory or one of its steps.

Masks are fixed (the eval seed), so two evaluations of the same checkpoint and files agree exactly.
Prints a final line `RESULT loss=... accuracy=... perplexity=... records=...`.
"""

import jax
import ml_collections
from absl import app, flags
from flax import nnx

from mlm_jax import data, errors, metrics, rundir, steps
from mlm_jax import sharding as shd
from mlm_jax.checkpoint import CheckpointError
from mlm_jax.errors import ConfigError, DataError


def evaluate(workdir: str, files: str | None = None, step: int | None = None,
             max_batches: int | None = None, run: rundir.Loaded | None = None) -> dict:
  """Loss, accuracy, perplexity, masked tokens and records of checkpoint `step` (default: the best
  by the run's own best_metric, else the newest) on `files` (default: the run's eval split).
  `run`: what rundir.load(workdir, step) returned, if the caller has it already."""
  run = run or rundir.load(workdir, step)
  config = ml_collections.ConfigDict(run.config)  # a private copy: --files must not leak
  if files:
    if config.data.source in ('tfds', 'hf'):
      raise ConfigError('data.source', "--files needs a 'text' or 'jsonl' run")
    config.data.eval_files = files
    config.data.max_records = 0
  mesh = shd.make_mesh(config)  # the run's mesh and eval step: the numbers of its own evals
  cfg = rundir.model_config(run.config, 'float32')  # full precision, on any device
  graphdef, params = nnx.split(rundir.make_model(cfg, run.params))
  params_shardings = shd.state_shardings(params, mesh)
  params = jax.device_put(params, params_shardings)
  records = 0

  def counted(batches):
    nonlocal records
    for batch in batches:
      records += int(batch['segment_ids'].max(axis=1).sum())  # packed: k records per row
      yield batch

  def compile_for(batch):
    jitted = steps.jit_eval_step(graphdef, mesh, params_shardings, tuple(sorted(batch)),
                                 config.sharding.fixed_order_reduction)
    return steps.compile_ahead(jitted, params, shd.abstract_batch(batch, mesh))[0]

  batches = data.eval_batches(config, run.tokenizer, process_index=jax.process_index(),
                              process_count=jax.process_count(), max_batches=max_batches)
  sums = steps.run_eval(params, counted(batches), mesh=mesh, compile_for=compile_for)
  m = metrics.eval_summary(sums)
  return {'step': run.step, 'loss': m['eval/loss'], 'accuracy': m['eval/accuracy'],
          'perplexity': m['eval/perplexity'], 'masked_tokens': m['eval/masked_tokens'],
          'records': records}


def _define_flags():
  # Defined only when run as a program, so that tools can import this module and define their own.
  rundir.define_path_flags()
  flags.DEFINE_string('files', None, 'Comma-separated globs of files to evaluate on; default: the '
                      'run\'s own eval split.')
  flags.DEFINE_integer('max_batches', None, 'Evaluate at most this many batches.')


def main(argv):
  del argv
  f = flags.FLAGS
  try:
    r = evaluate(rundir.path_from_flags(), f.files, f.step, f.max_batches)
  except (ConfigError, DataError, CheckpointError) as e:
    errors.fail(e)
  print(f"step {r['step']}: {r['masked_tokens']:.0f} masked tokens in {r['records']} records")
  print(f"RESULT loss={r['loss']:.6f} accuracy={r['accuracy']:.6f} "
        f"perplexity={r['perplexity']:.4f} records={r['records']}")


if __name__ == '__main__':
  _define_flags()
  app.run(main)
