"""Prints the step and state SHA-256 of a checkpoint, as `mlm_jax.checkpoint.digest` computes it.

  python tools/checkpoint_digest.py WORKDIR [--step N]

Reads WORKDIR/checkpoints on the CPU without knowing the model (the array tree comes from the
checkpoint's own metadata). Compare the printed digest with the one a live run logs, or with another
run's checkpoint, to check that two runs are bitwise identical. Exit status 1 if the arrays do not
match the digest recorded at save time (a corrupt checkpoint).
"""
import argparse
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # before jax is imported: never grab an accelerator


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('workdir', help='run directory holding checkpoints/')
  parser.add_argument('--step', type=int, default=None, help='step to read (default: newest)')
  args = parser.parse_args(argv)

  from mlm_jax import checkpoint  # pylint: disable=import-outside-toplevel

  step, state, meta = checkpoint.read_checkpoint(os.path.join(args.workdir, 'checkpoints'),
                                                 args.step)
  sha = checkpoint.digest(state)
  recorded = meta.get('state_sha256')
  print(f'step: {step}')
  print(f'recorded sha256: {recorded}')
  print(f'computed sha256: {sha}' + ('' if sha == recorded else '  MISMATCH: corrupt checkpoint'))
  print(f'RESULT step={step} sha256={sha}')
  return 0 if sha == recorded else 1


if __name__ == '__main__':
  sys.exit(main())
