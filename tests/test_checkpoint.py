"""Checkpoint tests: exact round trip, resharding, retention, corruption fallback, save errors."""
import errno
import logging
import os
import signal
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
import optax
from flax import nnx
import pytest

from mlm_jax import checkpoint as ckpt
from mlm_jax import config as config_lib
from mlm_jax import preemption
from mlm_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META = {'config': {'model': {'hidden_size': 16}, 'seed': 0}, 'tokenizer': {'vocab_size': 64}}


def make_state(seed=0):
  """A trainer-shaped state: nnx params, optax AdamW state (namedtuples, int32 count), step, key."""
  _, params = nnx.split(nnx.Linear(64, 32, rngs=nnx.Rngs(seed)), nnx.Param)
  opt_state = optax.adamw(1e-3).init(params)
  opt_state = jax.tree.map(lambda x: x + 0.5 if x.dtype == jnp.float32 else x + 3, opt_state)
  return {'step': jnp.int32(seed + 1), 'params': params, 'opt_state': opt_state,
          'key': jax.random.key_data(jax.random.key(seed))}


def mesh_shardings(state):
  mesh = jax.make_mesh((4, 2), ('data', 'fsdp'))
  return jax.tree.map(
      lambda x: NamedSharding(mesh, PartitionSpec('data', 'fsdp') if x.ndim == 2 else
                              PartitionSpec('data') if x.ndim == 1 and x.shape[0] % 4 == 0 else
                              PartitionSpec()), state)


def on_mesh(state):
  return jax.device_put(state, mesh_shardings(state))


def abstract(state, shardings=None):
  shardings = shardings or jax.tree.map(lambda x: x.sharding, state)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def data_iter():
  return iter(grain.MapDataset.range(100).shuffle(seed=1).batch(4).to_iter_dataset())


def assert_bitwise_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


@pytest.fixture
def absl_errors(caplog):
  caplog.set_level(logging.INFO)
  return lambda: [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_digest_ignores_sharding_and_sees_every_bit():
  state = make_state()
  assert ckpt.digest(state) == ckpt.digest(on_mesh(state))
  assert ckpt.digest(state) == ckpt.digest(jax.device_get(state))  # numpy, as the tool reads it
  kernel = np.asarray(state['params']['kernel'].get_value())
  flipped = kernel.copy()
  flipped.view(np.uint32)[5, 7] ^= 1  # lowest mantissa bit of one element
  swapped = kernel.copy()
  swapped[[0, 1]] = swapped[[1, 0]]
  for other in (flipped, swapped):
    changed = jax.tree_util.tree_map_with_path(
        lambda p, x: other if 'params' in str(p) and x.shape == other.shape else x, state)
    assert ckpt.digest(changed) != ckpt.digest(state)


def test_round_trip_is_exact_including_data_position(tmp_path):
  state = on_mesh(make_state())
  host_copy, live_digest, target = jax.device_get(state), ckpt.digest(state), abstract(state)
  it = data_iter()
  consumed = [next(it) for _ in range(3)]
  with ckpt.Checkpointer(tmp_path) as c:
    assert c.save(3, state, metadata={**META, 'data_state': it.get_state()},
                  metrics={'eval/loss': 1.0})
    assert c.last_blocking_s > 0
    jax.tree.map(lambda x: x.delete(), state)  # what donating the state to the next step does
    expected_next = [next(it) for _ in range(4)]  # training goes on while the save is written
  fresh = data_iter()
  restored, meta = ckpt.Checkpointer(tmp_path).restore(target)
  fresh.set_state(meta['data_state'])  # the input position travels in the JSON metadata
  assert_bitwise_equal(restored, host_copy)
  assert ckpt.digest(restored) == live_digest == meta['state_sha256']
  for got, want in zip([next(fresh) for _ in range(4)], expected_next):
    np.testing.assert_array_equal(got, want)
  assert not any(np.array_equal(consumed[-1], x) for x in expected_next)
  assert isinstance(restored['params'], nnx.State)
  for x, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    assert x.sharding == t.sharding
  assert meta['config'] == META['config'] and meta['tokenizer'] == META['tokenizer']
  assert meta['versions']['orbax-checkpoint'] and meta['versions']['jax'] == jax.__version__
  assert meta['checkpoint_info']['step'] == 3


def test_restore_reshards_one_device_checkpoint_onto_eight(tmp_path):
  state = jax.device_put(make_state(), jax.devices()[0])
  with ckpt.Checkpointer(tmp_path) as c:
    c.save(1, state, metadata=META)
  target = abstract(state, mesh_shardings(state))
  restored, _ = ckpt.Checkpointer(tmp_path).restore(target)
  assert_bitwise_equal(restored, state)
  kernel = restored['params']['kernel'].get_value()
  assert kernel.sharding == target['params']['kernel'].get_value().sharding
  assert len(kernel.sharding.device_set) == 8 and len(kernel.addressable_shards) == 8


def test_restore_without_checkpoint_and_with_wrong_model(tmp_path):
  c = ckpt.Checkpointer(tmp_path)
  assert c.restore(abstract(make_state())) is None
  c.save(1, make_state(), metadata=META)
  c.wait()
  _, other = nnx.split(nnx.Linear(64, 16, rngs=nnx.Rngs(0)), nnx.Param)
  wrong = {**make_state(), 'params': other}
  with pytest.raises(ckpt.CheckpointError, match='does not match'):
    c.restore(abstract(wrong))
  assert c.all_steps() == [1]  # a model change is not corruption: nothing is set aside
  c.close()


def test_save_policy_never_saves_a_step_twice(tmp_path):
  state = make_state()
  with ckpt.Checkpointer(tmp_path, save_every=5, async_save=False) as c:
    assert not c.save(3, state, metadata=META)
    assert c.save(5, state, metadata=META)
    assert not c.save(5, state, metadata=META, force=True)
    assert c.save(6, state, metadata=META, force=True)
    assert c.all_steps() == [5, 6]


def test_keeps_newest_and_best(tmp_path):
  state = make_state()
  losses = {10: 0.5, 20: 0.1, 30: 0.4, 40: None, 50: 0.9}  # the newest is the worst
  with ckpt.Checkpointer(tmp_path, keep=2, keep_best=1) as c:
    for step, loss in losses.items():
      c.save(step, state, metadata=META, metrics=None if loss is None else {'eval/loss': loss})
    c.wait()
    assert c.all_steps() == [20, 40, 50]
    assert c.best_step() == 20
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ['20', '40', '50']
  with ckpt.Checkpointer(tmp_path, keep=2, keep_best=1) as c:  # metrics are read back from disk
    assert c.best_step() == 20
    c.save(60, state, metadata=META, metrics={'eval/loss': 0.05, 'eval/accuracy': 0.9})
    c.wait()
    assert c.all_steps() == [50, 60] and c.best_step() == 60


def _two_checkpoints(tmp_path):
  old, new = make_state(0), make_state(1)
  with ckpt.Checkpointer(tmp_path, async_save=False) as c:
    c.save(1, old, metadata=META)
    c.save(2, new, metadata=META)
  return old, new


def _largest_array_file(step_dir):
  files = [p for p in (step_dir / 'state').rglob('*') if p.is_file() and p.parent.name == 'd']
  return max(files, key=lambda p: p.stat().st_size)


# On truncation orbax's other read coroutines are torn down and warn as 'unraisable': harmless.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('damage', ['flip', 'truncate'])
def test_damaged_newest_checkpoint_falls_back(tmp_path, absl_errors, damage):
  old, _ = _two_checkpoints(tmp_path)
  f = _largest_array_file(tmp_path / '2')
  data = bytearray(f.read_bytes())
  if damage == 'flip':
    for i in range(len(data) // 2, len(data) // 2 + 4):
      data[i] ^= 0xFF
    f.write_bytes(bytes(data))
  else:
    f.write_bytes(bytes(data[:len(data) // 2]))
  c = ckpt.Checkpointer(tmp_path)
  restored, meta = c.restore(abstract(old))
  assert_bitwise_equal(restored, old)
  assert meta['checkpoint_info']['step'] == 1
  reason = 'sha256 mismatch' if damage == 'flip' else 'cannot read its arrays'
  assert any('step 2' in m and 'falling back' in m and reason in m for m in absl_errors())
  # Set aside, not deleted: step 2 can be written again by the resumed run.
  assert c.all_steps() == [1] and len(list(tmp_path.glob('2.corrupt-*'))) == 1
  assert c.save(2, old, metadata=META)
  c.close()


def test_half_written_checkpoints_are_ignored_and_cleaned(tmp_path):
  old, _ = _two_checkpoints(tmp_path)
  (tmp_path / '2' / ckpt.COMMIT_MARKER).unlink()  # e.g. a copy that stopped half way
  tmp_dir = tmp_path / '3.orbax-checkpoint-tmp'  # what a save killed mid-write leaves
  (tmp_dir / 'state').mkdir(parents=True)
  (tmp_dir / 'state' / 'junk').write_bytes(b'x' * 100)
  c = ckpt.Checkpointer(tmp_path)
  assert c.latest_step() == 1 and not (tmp_path / '2').exists()
  restored, _ = c.restore(abstract(old))
  assert_bitwise_equal(restored, old)
  c.save(3, old, metadata=META)  # orbax awaits its start-up cleanup before the first save
  c.close()
  assert not tmp_dir.exists() and c.all_steps() == [1, 3]


@pytest.mark.parametrize('surfaces_in', ['save', 'wait', 'close'])
def test_async_save_failure_surfaces_and_keeps_previous(tmp_path, monkeypatch, surfaces_in):
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=import-outside-toplevel
  old, new = make_state(0), make_state(1)
  c = ckpt.Checkpointer(tmp_path, keep=1)  # the policy marks step 1 for deletion at save(2)
  c.save(1, old, metadata=META)
  c.wait()

  async def disk_full(self):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', disk_full)
  assert c.save(2, new, metadata=META)  # the failure happens in the background
  with pytest.raises(ckpt.CheckpointError, match=r'step 2 .*No space left on device'):
    if surfaces_in == 'save':
      c.save(3, new, metadata=META, force=True)
    elif surfaces_in == 'wait':
      c.wait()
    else:
      c.close()
  monkeypatch.undo()
  if surfaces_in != 'close':
    assert c.all_steps() == [1]
    c.close()  # raised once, not again
  restored, meta = ckpt.Checkpointer(tmp_path).restore(abstract(old))
  assert_bitwise_equal(restored, old)
  assert meta['checkpoint_info']['step'] == 1


def test_digest_tool_matches_live_state(tmp_path):
  state = on_mesh(make_state(3))
  with ckpt.Checkpointer(tmp_path / 'checkpoints') as c:
    c.save(7, state, metadata=META)
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}  # one CPU device, unlike the save
  out = subprocess.run([sys.executable, os.path.join(REPO, 'tools', 'checkpoint_digest.py'),
                        str(tmp_path), '--step', '7'], env=env, capture_output=True, text=True,
                       check=True).stdout
  assert out.strip().splitlines()[-1] == f'RESULT step=7 sha256={ckpt.digest(state)}'


def test_validate_resume():
  saved = {'seed': 1, 'model': {'hidden_size': 128, 'num_layers': 2},
           'data': {'max_len': 64, 'eval_files': '', 'cache_dir': ''},
           'train': {'steps': 100, 'batch_size': 8, 'eval_every': 10}, 'checkpoint': {'keep': 2}}
  changed = lambda section, key, value: {**saved, section: {**saved[section], key: value}}
  with pytest.raises(ConfigError, match='model.hidden_size') as e:
    config_lib.validate_resume(saved, changed('model', 'hidden_size', 256), allow_inexact=False)
  assert e.value.field == 'model.hidden_size' and '128' in str(e.value) and '256' in str(e.value)
  for section, field, value in [('data', 'max_len', 128), ('data', 'eval_files', 'x.txt'),
                                ('train', 'batch_size', 16)]:
    with pytest.raises(ConfigError, match=f'{section}.{field}'):
      config_lib.validate_resume(saved, changed(section, field, value), allow_inexact=False)
  with pytest.raises(ConfigError, match='seed'):
    config_lib.validate_resume(saved, {**saved, 'seed': 2}, allow_inexact=False)
  for section, field, value in [('train', 'eval_every', 5), ('checkpoint', 'keep', 5),
                                ('data', 'cache_dir', '/tmp'), ('data', 'num_workers', 4)]:
    config_lib.validate_resume(saved, changed(section, field, value), allow_inexact=False)
  # A longer run changes a decaying schedule, so only a constant schedule may change train.steps.
  with pytest.raises(ConfigError, match='train.steps'):
    config_lib.validate_resume(saved, changed('train', 'steps', 1000), allow_inexact=False)
  constant = {**saved, 'optimizer': {'schedule': 'constant'}}
  config_lib.validate_resume(constant, {**constant, 'train': {**saved['train'], 'steps': 1000}},
                       allow_inexact=False)
  config_lib.validate_resume(saved, changed('model', 'hidden_size', 256), allow_inexact=True)


def test_preemption_handler():
  original = signal.getsignal(signal.SIGTERM)
  handler = preemption.install()
  try:
    assert not preemption.should_stop(1)
    os.kill(os.getpid(), signal.SIGINT)
    assert handler.should_stop(2) and preemption.should_stop(2)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C aborts at once
    handler = preemption.install()
    assert not handler.should_stop(3)
    os.kill(os.getpid(), signal.SIGTERM)
    assert handler.should_stop(3)
  finally:
    handler.uninstall()
  assert signal.getsignal(signal.SIGTERM) == original


def test_exactness_fields_are_listed_in_one_place():
  assert config_lib.breaks_exactness('model.num_layers') and config_lib.breaks_exactness('seed')
  assert config_lib.breaks_exactness('data.mask_rate') and config_lib.breaks_exactness('train.grad_accum_steps')
  assert config_lib.breaks_exactness('train.steps')  # a decaying schedule depends on it
  for free in ('data.num_workers', 'train.log_every', 'checkpoint.every', 'data.cache_dir',
               'train.eval_every'):
    assert not config_lib.breaks_exactness(free), free


_TWO_PROCESS_WORKER = r'''
import os, sys
pid, workdir, port = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(f'localhost:{port}', num_processes=2, process_id=pid)
import grain, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from mlm_jax import checkpoint as ckpt

mesh = jax.make_mesh((4, 2), ('data', 'fsdp'))
sh = {'w': NamedSharding(mesh, PartitionSpec('data', 'fsdp')),
      'key': NamedSharding(mesh, PartitionSpec())}
make = lambda seed: jax.jit(lambda: {'w': jax.random.normal(jax.random.key(seed), (64, 32)),
                                     'key': jax.random.key_data(jax.random.key(seed))},
                            out_shardings=sh)()
data = lambda: iter(grain.MapDataset.range(100).shuffle(seed=1)[pid::2].batch(4).to_iter_dataset())
old, new = make(0), make(1)
it = data()
next(it)
with ckpt.Checkpointer(workdir) as c:
  c.save(1, old, metadata={'data_state': it.get_state()})
  want = next(it)
  c.save(2, new, metadata={'data_state': it.get_state()})
if pid == 0:  # flip bytes in the newest checkpoint's largest array file
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(workdir, '2', 'state'))
           for f in fs if os.path.basename(r) == 'd']
  f = max(files, key=os.path.getsize)
  b = bytearray(open(f, 'rb').read())
  for i in range(len(b) // 2, len(b) // 2 + 4):
    b[i] ^= 0xFF
  open(f, 'wb').write(bytes(b))
from jax.experimental import multihost_utils
multihost_utils.sync_global_devices('flipped')
target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), old, sh)
state, meta = ckpt.Checkpointer(workdir).restore(target)
# The JSON metadata is written by process 0, so it holds process 0's position (the trainer
# gathers every shard's position into it): every process checks that one.
shard0 = lambda: iter(grain.MapDataset.range(100).shuffle(seed=1)[0::2].batch(4).to_iter_dataset())
reference = shard0()
want = [next(reference) for _ in range(2)][1]
it2 = shard0()
it2.set_state(meta['data_state'])
print('RESULT', meta['checkpoint_info']['step'], ckpt.digest(state) == ckpt.digest(old),
      np.array_equal(next(it2), want), ckpt.digest(old))
'''


@pytest.mark.slow
def test_two_processes_agree_on_digest_fallback_and_data_position(tmp_path):
  script = tmp_path / 'worker.py'
  script.write_text(_TWO_PROCESS_WORKER)
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  procs = [subprocess.Popen([sys.executable, str(script), str(i), str(tmp_path / 'ckpt'), str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  results = []
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    results.append(out.strip().splitlines()[-1].split())
  # Both fell back to step 1 together, restored it exactly, and each got its own data position.
  assert results[0][:4] == results[1][:4] == ['RESULT', '1', 'True', 'True']
  assert results[0][4] == results[1][4]  # the digest is the same on every process
