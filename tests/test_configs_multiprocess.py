"""Every shipped config starts multi-process: nothing touches a JAX backend before
jax.distributed.initialize(), so the CLI's --coordinator_address/--num_processes/--process_id work
with each of them (two CPU processes on localhost, gloo collectives, as on a multi-host pod).
Hardware-aware values ('auto') are picked by the trainer after that start, and recorded."""
import glob
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

from mlm_jax import checkpoint as ckpt
from mlm_jax import data, rundir
from tests.test_multihost import REPO, _env, _free_port

# Every config file and its variants (get_config(variant); None: get_config() takes none).
VARIANTS = {
    'quickstart': [None],
    'mini_bert': [''],
    'event_bert': [''],
    'bert_base': ['', 'seq512'],
    'bert_large': ['', 'seq512'],
    'domainbert': ['', 'tiny', 'small'],
    'modernbert_base': ['', 'tiny', 'mini'],
}
STEPS = 3
# A shape small enough for two processes on two cores; everything else as the config has it.
SMALL = ['--config.model.num_layers=1', '--config.model.hidden_size=32', '--config.model.num_heads=2',
         '--config.model.intermediate_size=64', '--config.model.max_len=32',
         f'--config.train.steps={STEPS}', '--config.train.log_every=1',
         f'--config.train.eval_every={STEPS}', '--config.train.eval_steps=1',
         '--config.train.progress_bar=false', '--config.train.compilation_cache_dir=',
         '--config.optimizer.warmup_steps=1', f'--config.checkpoint.every={STEPS}',
         '--config.data.chunk_records=256']
# bert_base/bert_large/modernbert_base take the user's vocabulary: the shipped one, as a user would
# point at theirs.
SHIPPED_VOCAB = ['--config.data.vocab_path={assets}/shakespeare/vocab.txt',
                 '--config.model.vocab_size=2048']


def test_every_config_file_is_listed():
  shipped = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, 'configs', '*.py'))}
  assert shipped - {'__init__'} == set(VARIANTS)


def test_configs_never_start_a_jax_backend():
  """Loading every config (every variant) leaves JAX unstarted: jax.distributed.initialize() still
  works afterwards (it refuses once any backend is up), and no backend was created."""
  script = textwrap.dedent(f'''
      import importlib.util, os, socket, sys
      import jax
      from jax._src import xla_bridge
      for name, variants in {VARIANTS!r}.items():
        spec = importlib.util.spec_from_file_location(
            'cfg_' + name, os.path.join({REPO!r}, 'configs', name + '.py'))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for v in variants:
          module.get_config() if v is None else module.get_config(v)
      assert not xla_bridge._backends, sorted(xla_bridge._backends)
      with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
      jax.distributed.initialize(f'127.0.0.1:{{port}}', num_processes=1, process_id=0)
      print('OK', jax.process_count())
      ''')
  proc = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=_env(1), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split()[-2:] == ['OK', '1']


def run_two_processes(config, workdir, *extra):
  """Both processes of `python -m mlm_jax.main` over loopback; returns their stderr tails."""
  port = _free_port()
  cmd = [sys.executable, '-m', 'mlm_jax.main', f'--config={config}', f'--workdir={workdir}',
         *SMALL, *extra, f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2']
  procs = [subprocess.Popen([*cmd, f'--process_id={i}'], cwd=REPO, env=_env(2),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    errs = [p.communicate(timeout=600)[1] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, err) in enumerate(zip(procs, errs)):
    assert p.returncode == 0, f'process {i} exited {p.returncode}:\n{err[-3000:]}'
  return errs


# domainbert is the one whose defaults depend on the hardware; the rest take minutes together.
@pytest.mark.parametrize('name', [
    'domainbert',
    pytest.param('quickstart', marks=pytest.mark.slow),
    pytest.param('mini_bert', marks=pytest.mark.slow),
    pytest.param('event_bert', marks=pytest.mark.slow),
    pytest.param('bert_base', marks=pytest.mark.slow),
    pytest.param('bert_large', marks=pytest.mark.slow),
    pytest.param('modernbert_base', marks=pytest.mark.slow),
])
def test_shipped_config_trains_in_two_processes(name, tmp_path):
  workdir = tmp_path / 'run'
  extra = SHIPPED_VOCAB if name.startswith(('bert_', 'modernbert_')) else []
  run_two_processes(f'configs/{name}.py', workdir, *extra)
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  train_loss = {r['step']: r['train/loss'] for r in rows if 'train/loss' in r}
  assert sorted(train_loss) == list(range(1, STEPS + 1))
  assert all(math.isfinite(v) for v in train_loss.values())
  assert any('eval/loss' in r and r['step'] == STEPS for r in rows)
  step, _, meta = ckpt.read_checkpoint(str(workdir / 'checkpoints'))
  assert step == STEPS and meta['checkpoint_info']['process_count'] == 2
  config = json.loads((workdir / 'config.json').read_text())
  assert meta['config'] == config
  # 'auto' values were picked after the start, for the backend the run has: numbers recorded.
  assert isinstance(config['train']['batch_size'], int)
  assert config['model']['dtype'] == 'float32'  # CPU
  if name == 'domainbert':
    assert config['train']['batch_size'] == 16  # 'auto' on CPU
  # The step holds the run's tokenizer (written once, by two processes saving together).
  step_dir = rundir.resolve(workdir / 'checkpoints' / str(STEPS))
  with ckpt.Checkpointer(str(workdir / 'checkpoints'), read_only=True) as checkpointer:
    assert checkpointer.tokenizer(STEPS) is not None
  in_step = rundir.load_tokenizer(step_dir, STEPS)
  assert rundir.tokenizer_files(in_step) == rundir.tokenizer_files(
      data.load_tokenizer(str(workdir / 'tokenizer')))
