"""A training run read back: the choice of a checkpoint step, its params, the config, the tokenizer,
the model, metrics.jsonl. Shared by evaluate, predict and the tools, so none imports another.

A path is either a run directory (config.json, tokenizer/, metrics.jsonl, checkpoints/<step>/) or
one checkpoint step directory (`.../<step>`). Every file is reached through etils.epath, so a run
may live on gs:// as well as on a local disk.

Where the config and the tokenizer come from is decided in one place each (`find_config`,
`load_tokenizer`): the step itself (its metadata's config, its 'tokenizer' item), so a step directory
copied anywhere is enough; for steps saved without a tokenizer, the run directory's tokenizer/.
"""
import dataclasses
import json
import tempfile
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from mlm_jax import checkpoint as ckpt
from mlm_jax import data
from mlm_jax import model as model_lib

CONFIG_FILE, TOKENIZER_DIR, CHECKPOINTS_DIR, METRICS_FILE = (
    'config.json', 'tokenizer', 'checkpoints', 'metrics.jsonl')


@dataclasses.dataclass(frozen=True)
class RunDir:
  """Where a run's pieces are. `run` is None for a step directory outside any run directory."""
  path: epath.Path  # as given
  run: epath.Path | None  # the run directory: config.json, tokenizer/, checkpoints/
  checkpoints: epath.Path  # the directory of the step directories
  step: int | None  # the step, when `path` is one step directory


class Loaded(NamedTuple):
  """A checkpoint step read back, ready to evaluate or predict with."""
  step: int
  config: dict  # the run's resolved config
  tokenizer: data.Tokenizer
  params: dict  # nested dict of numpy arrays (no nnx 'value' level)


def resolve(path) -> RunDir:
  """The RunDir of a run directory or a step directory; CheckpointError if it is neither."""
  p = epath.Path(path)
  if not p.exists():
    raise ckpt.CheckpointError(f'{path}: not found')
  if (p / CHECKPOINTS_DIR).is_dir():
    return RunDir(p, p, p / CHECKPOINTS_DIR, None)
  if p.is_dir() and p.name.isdigit():  # orbax names step directories by their step
    run = p.parent.parent if p.parent.name == CHECKPOINTS_DIR else None
    return RunDir(p, run, p.parent, int(p.name))
  raise ckpt.CheckpointError(f'{path}: neither a run directory (no {CHECKPOINTS_DIR}/ in it) nor '
                             'a checkpoint step directory (named by its step number)')


def _checkpointer(run: RunDir, config: dict | None = None) -> ckpt.Checkpointer:
  k = (config or {}).get('checkpoint', {})
  return ckpt.Checkpointer(str(run.checkpoints), read_only=True,
                           best_metric=k.get('best_metric', 'eval/loss'),
                           best_mode=k.get('best_mode', 'min'))


def choose_step(run: RunDir, step: int | None = None) -> int:
  """`step`; else the step of a step directory; else the best checkpoint by the run's own
  checkpoint.best_metric/best_mode (among steps that recorded it); else the newest one."""
  if step is not None:
    if run.step is not None and step != run.step:
      raise ckpt.CheckpointError(f'{run.path} is checkpoint step {run.step}, not step {step}')
    return step
  if run.step is not None:
    return run.step
  checkpointer = _checkpointer(run, _run_config(run))
  try:
    best = checkpointer.best_step()
    step = checkpointer.latest_step() if best is None else best
  finally:
    checkpointer.close()
  if step is None:
    raise ckpt.CheckpointError(f'No checkpoint in {run.checkpoints}')
  return step


def _run_config(run: RunDir) -> dict | None:
  """The run directory's config.json, if there is one."""
  if run.run is None or not (run.run / CONFIG_FILE).exists():
    return None
  return json.loads((run.run / CONFIG_FILE).read_text())


def find_config(run: RunDir, step: int) -> dict:
  """The resolved config the step was saved with (its metadata); the run directory's config.json
  only for a step whose metadata has none."""
  checkpointer, error = _checkpointer(run), None
  try:
    config = checkpointer.metadata(step).get('config')
  except Exception as e:  # noqa: BLE001 -- unreadable metadata: config.json, else say why
    config, error = None, e
  finally:
    checkpointer.close()
  if config is None:
    config = _run_config(run)
  if config is not None:
    return config
  if error is not None:
    first_line = (str(error).strip().splitlines() or [''])[0]
    raise ckpt.CheckpointError(f'{run.path}: no {CONFIG_FILE}, and the metadata of step {step} '
                               f'cannot be read ({type(error).__name__}: {first_line})') from error
  raise ckpt.CheckpointError(f'{run.path}: no {CONFIG_FILE} and no config in step {step}')


def tokenizer_dir(run: RunDir, step: int) -> epath.Path:
  """The run directory's tokenizer (as Tokenizer.save wrote it): where a step saved without its
  own tokenizer finds one."""
  if run.run is None:
    raise ckpt.CheckpointError(f'{run.path}: checkpoint step {step} was saved without its tokenizer '
                               f'and is outside its run directory: its tokenizer is in the run\'s '
                               f'{TOKENIZER_DIR}/')
  return run.run / TOKENIZER_DIR


def tokenizer_files(tokenizer: data.Tokenizer) -> dict[str, str]:
  """The files `tokenizer.save` writes, by name: what a checkpoint step carries as its tokenizer."""
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer.save(tmp)
    return {p.name: p.read_bytes().decode('utf-8') for p in sorted(epath.Path(tmp).iterdir())}


def tokenizer_from_files(files: dict[str, str]) -> data.Tokenizer:
  """The tokenizer of `tokenizer_files`."""
  with tempfile.TemporaryDirectory() as tmp:
    for name, text in files.items():
      if name in ('', '.', '..') or epath.Path(name).name != name:
        raise ckpt.CheckpointError(f'tokenizer file name {name!r} in a checkpoint: not a plain name')
      (epath.Path(tmp) / name).write_bytes(text.encode('utf-8'))
    return data.load_tokenizer(tmp)


def load_tokenizer(run: RunDir, step: int) -> data.Tokenizer:
  """The tokenizer saved in the step; for a step saved without one, the run directory's."""
  checkpointer = _checkpointer(run)
  try:
    files = checkpointer.tokenizer(step)
  finally:
    checkpointer.close()
  if files is not None:
    return tokenizer_from_files(files)
  return data.load_tokenizer(str(tokenizer_dir(run, step)))


def _unwrap(tree):
  """The restored params tree without nnx's per-variable {'value': array} level, as numpy."""
  if isinstance(tree, dict):
    if set(tree) == {'value'} and not isinstance(tree['value'], dict):
      return np.asarray(tree['value'])
    return {k: _unwrap(v) for k, v in tree.items()}
  return np.asarray(tree)


def read_params(run: RunDir, step: int) -> tuple[dict, dict]:
  """(params as a nested dict of numpy arrays, the step's metadata), read onto one local device
  and checked against the checkpoint's digest; no model or optimizer needed."""
  checkpointer = _checkpointer(run)
  try:
    restored = checkpointer.restore(None, step=step)
  finally:
    checkpointer.close()
  if restored is None:
    raise ckpt.CheckpointError(f'No checkpoint in {run.checkpoints}')
  state, meta = restored
  return _unwrap(state['params']), meta


def load(path, step: int | None = None) -> Loaded:
  """Step (see `choose_step`), config, tokenizer and params of a run or step directory."""
  run = resolve(path)
  step = choose_step(run, step)
  config = find_config(run, step)
  tokenizer = load_tokenizer(run, step)
  params, _ = read_params(run, step)
  return Loaded(step, config, tokenizer, params)


def model_config(config: dict, dtype: str = 'float32') -> model_lib.BertConfig:
  """The BertConfig of a resolved config dict, computing in `dtype`."""
  return model_lib.BertConfig.from_config(ml_collections.ConfigDict(config['model']), dtype)


def make_model(cfg: model_lib.BertConfig, params: dict):
  """The model of cfg.arch (Bert or ModernBert) holding `params` (a nested dict of arrays, as
  `read_params` returns)."""
  abstract = nnx.eval_shape(lambda: model_lib.build(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)


def read_metrics(path) -> dict[str, tuple[list[int], list[Any]]]:
  """metrics.jsonl of a run directory: metric name -> (steps, values); a line cut short by a kill
  is skipped."""
  series = {}
  for line in (epath.Path(path) / METRICS_FILE).read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    for k, v in row.items():
      if k != 'step' and isinstance(v, (int, float)):
        steps, values = series.setdefault(k, ([], []))
        steps.append(row['step'])
        values.append(v)
  return series


def define_path_flags():
  """--checkpoint / --workdir (one of them) and --step of the CLIs that read a run. Defined only
  when run as a program: importing a module must not claim global flag names."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string('checkpoint', None, 'A checkpoint step directory (DIR/checkpoints/STEP, or '
                      'a copy of one anywhere), or a run directory.')
  flags.DEFINE_string('workdir', None, 'A run directory (checkpoints/, tokenizer/), or one '
                      'checkpoint step directory.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: best if any, else newest).')
  flags.mark_flags_as_mutual_exclusive(['checkpoint', 'workdir'], required=True)


def path_from_flags() -> str:
  from absl import flags  # pylint: disable=import-outside-toplevel
  return flags.FLAGS.checkpoint or flags.FLAGS.workdir
