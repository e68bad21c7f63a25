"""python -m mlm_jax.evaluate: the same numbers as the eval during training, on any files."""
import os
import subprocess
import sys

from mlm_jax import evaluate, train
from tests.test_resume import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_evaluate_reproduces_the_training_eval_and_reads_other_files(tmp_path):
  workdir = str(tmp_path / 'run')
  config = tiny()
  config.train.update(steps=6, eval_every=6, eval_steps=-1)
  out = train.train_and_evaluate(config, workdir)
  r = evaluate.evaluate(workdir)
  assert r['step'] == 6
  assert r['loss'] == out['eval/loss'] and r['accuracy'] == out['eval/accuracy']
  other = tmp_path / 'held_out.txt'
  other.write_text('To be, or not to be, that is the question.\n\nWhether tis nobler in the mind.\n')
  proc = subprocess.run([sys.executable, '-m', 'mlm_jax.evaluate', f'--workdir={workdir}',
                         f'--files={other}'], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = proc.stdout.strip().splitlines()[-1]
  assert result.startswith('RESULT loss=') and result.endswith('records=2'), result
  assert float(result.split('loss=')[1].split()[0]) > 0
