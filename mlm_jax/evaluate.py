"""MLM loss, accuracy and perplexity of a trained checkpoint on any files in the run's input format.

  python -m mlm_jax.evaluate --workdir DIR --files 'held_out/*.txt' [--step N]

Masks are fixed (the eval seed), so two evaluations of the same checkpoint and files agree exactly.
Prints a final line `RESULT loss=... accuracy=... perplexity=... records=...`.
"""
import json
import os
import sys

import ml_collections
from absl import app, flags, logging

from mlm_jax.checkpoint import CheckpointError
from mlm_jax.errors import ConfigError, DataError

def load_run(workdir: str, step: int | None = None):
  """(config, tokenizer, trainer, params, step) of a run directory, params restored and verified."""
  from mlm_jax import checkpoint as ckpt
  from mlm_jax import data, predict, train
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise DataError(f'{path}: not found; is {workdir!r} a training run directory?')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.model.dtype = 'float32'  # evaluation numbers in full precision, on any device
  tokenizer = data.load_tokenizer(os.path.join(workdir, 'tokenizer'))
  trainer = train.Trainer(config, workdir)
  step = predict.choose_step(workdir, step)  # best by the run's own best_metric, else newest
  checkpointer = ckpt.Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True)
  try:
    state, _ = checkpointer.restore(trainer.abstract_state, step=step)
  finally:
    checkpointer.close()
  return config, tokenizer, trainer, state['params'], step


def evaluate(workdir: str, files: str | None = None, step: int | None = None,
             max_batches: int | None = None, run=None) -> dict:
  """`run`: what load_run(workdir, step) returned, if the caller has it already."""
  import jax
  from mlm_jax import data
  config, tokenizer, trainer, params, step = run or load_run(workdir, step)
  config = config.copy_and_resolve_references()  # --files must not leak into the caller's config
  if files:
    if config.data.source == 'tfds':
      raise ConfigError('data.source', "--files needs a 'text' or 'jsonl' run")
    config.data.eval_files = files
    config.data.max_records = 0
  batches = data.eval_batches(config, tokenizer, process_index=jax.process_index(),
                              process_count=jax.process_count(), max_batches=max_batches)
  stats = {'records': 0}

  def counted(batches):
    for batch in batches:
      if trainer.batch_keys is None:
        trainer.compile_steps(batch.keys())
      stats['records'] += int(batch['segment_ids'].max(axis=1).sum())  # packed: k records per row
      yield batch

  metrics = trainer.evaluate(params, counted(batches))
  return {'step': step, 'loss': metrics['eval/loss'], 'accuracy': metrics['eval/accuracy'],
          'perplexity': metrics['eval/perplexity'], 'masked_tokens': metrics['eval/masked_tokens'],
          'records': stats['records']}


def _define_flags():
  # Defined only when run as a program, so that tools can import this module and define their own.
  flags.DEFINE_string('workdir', None, 'A training run directory.', required=True)
  flags.DEFINE_string('files', None, 'Comma-separated globs of files to evaluate on; default: the '
                      'run\'s own eval split.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: best if any, else latest).')
  flags.DEFINE_integer('max_batches', None, 'Evaluate at most this many batches.')


def main(argv):
  del argv
  f = flags.FLAGS
  try:
    r = evaluate(f.workdir, f.files, f.step, f.max_batches)
  except (ConfigError, DataError, CheckpointError) as e:
    sys.exit(f'error: {e}')
  print(f"step {r['step']}: {r['masked_tokens']:.0f} masked tokens in {r['records']} records")
  print(f"RESULT loss={r['loss']:.6f} accuracy={r['accuracy']:.6f} "
        f"perplexity={r['perplexity']:.4f} records={r['records']}")


if __name__ == '__main__':
  _define_flags()
  app.run(main)
