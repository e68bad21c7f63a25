"""Plots a run's metrics.jsonl against step.

  python tools/plot_metrics.py RUN_DIR [--out metrics.png]

Panels: loss, accuracy, perplexity (train line, eval dots), learning rate, gradient norm, tokens/s.
The default output is RUN_DIR/metrics.png. RUN_DIR and --out may be local or gs://. Needs
matplotlib (pip install 'mlm_jax[plot]').
"""
import argparse
import io
import os
import sys

from etils import epath

from mlm_jax import paths
from mlm_jax.rundir import read_metrics

PANELS = (('loss', ('train/loss', 'eval/loss'), False),
          ('accuracy', ('train/accuracy', 'eval/accuracy'), False),
          ('perplexity', ('train/perplexity', 'eval/perplexity'), True),
          ('learning rate', ('train/learning_rate',), False),
          ('gradient norm', ('train/grad_norm',), True),
          ('tokens / s', ('train/tokens_per_sec',), False))


def plot(workdir: str, out: str | None = None) -> str:
  """Writes the PNG; returns its path."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  series = read_metrics(workdir)
  if not series:
    raise ValueError(f'{workdir}/metrics.jsonl has no metrics yet')
  out = out or os.path.join(workdir, 'metrics.png')  # os.path.join keeps a gs:// prefix whole
  fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), constrained_layout=True)
  for ax, (title, keys, log) in zip(axes.flat, PANELS):
    for key in keys:
      if key in series:
        steps, values = series[key]
        ax.plot(steps, values, 'o-' if key.startswith('eval/') else '-', ms=3, label=key.split('/')[0])
    if log and ax.lines:
      ax.set_yscale('log')
    ax.set_title(title)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    if len(ax.lines) > 1:
      ax.legend()
  fig.suptitle(epath.Path(paths.absolute(workdir)).name)
  image = io.BytesIO()  # then written whole, local or gs://
  fig.savefig(image, format=os.path.splitext(out)[1][1:] or 'png', dpi=100)
  plt.close(fig)
  paths.write_atomic(out, image.getvalue())
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('workdir', help='run directory holding metrics.jsonl')
  parser.add_argument('--out', default=None, help='PNG to write (default: RUN_DIR/metrics.png)')
  args = parser.parse_args(argv)
  try:
    print(plot(args.workdir, args.out))
  except (OSError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
