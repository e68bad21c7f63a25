"""Optional Weights & Biases logging: the same values metrics.jsonl gets, in a W&B run.

Used by metrics.Writer when config.train.wandb_project is set (and only on process 0). The W&B run
id is kept in WORKDIR/wandb_run_id (local or gs://), so a resumed run keeps logging into the same W&B run. Our step
goes in as the x-axis metric 'trainer/step' rather than W&B's own step counter: after a resume the
steps logged since the checkpoint are logged again, and W&B drops a step lower than one it saw.
"""
from etils import epath

from mlm_jax import paths
from mlm_jax.errors import ConfigError

RUN_ID_FILE = 'wandb_run_id'
STEP_KEY = 'trainer/step'


class WandbWriter:
  """`write(step, values)` and `close()`, like the other metric writers."""

  def __init__(self, project: str, workdir: str, config: dict | None = None,
               name: str | None = None):
    try:
      import wandb  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise ConfigError('train.wandb_project', f'{project!r} is set but wandb is not installed: '
                        "pip install wandb (or 'mlm_jax[wandb]'), or set it to ''.") from None
    self._wandb = wandb
    workdir = epath.Path(paths.absolute(workdir))  # local or gs://
    id_path = workdir / RUN_ID_FILE
    if id_path.exists():
      run_id = id_path.read_text().strip()
    else:
      run_id = wandb.util.generate_id()
      workdir.mkdir(parents=True, exist_ok=True)
      paths.write_atomic(id_path, run_id + '\n')
    # W&B keeps its own files in a local directory: the run's, or its default (./wandb) for a
    # run on an object store.
    local_dir = str(workdir) if paths.is_local(workdir) else None
    self.run = wandb.init(project=project, id=run_id, resume='allow', dir=local_dir, config=config,
                          name=name or workdir.name)
    self.run.define_metric(STEP_KEY)
    self.run.define_metric('*', step_metric=STEP_KEY)

  def write(self, step: int, values: dict):
    self.run.log({STEP_KEY: int(step), **{k: float(v) for k, v in values.items()}})

  def close(self):
    if self.run is not None:
      self.run.finish()
      self.run = None


def make_writer(project: str, workdir: str, config: dict | None = None) -> WandbWriter | None:
  """A WandbWriter, or None when `project` is empty (W&B off)."""
  if not project:
    return None
  return WandbWriter(project, workdir, config)
