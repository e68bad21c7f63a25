"""Turns a Hugging Face BERT or ModernBERT directory into an mlm_jax run directory to continue
pretraining.

  python tools/import_hf.py HF_DIR WORKDIR [--config=configs/X.py] [--config.train.steps=N ...]
      [--max_len=N] [--dropout=P] [--attention_dropout=P]
  python -m mlm_jax.main --config=WORKDIR/import_config.py --workdir=WORKDIR

HF_DIR holds config.json, model.safetensors (or pytorch_model.bin, which needs torch) and vocab.txt
(or a WordPiece tokenizer.json); a BertForMaskedLM or a ModernBertForMaskedLM (model_type
'modernbert': model.arch='modernbert', mlm_jax/hf_modernbert.py). The model section comes from
HF_DIR; everything else (data,
optimizer, train, checkpoint) from --config (default: the base config, i.e. the shipped corpus).
WORKDIR gets config.json, tokenizer/, vocab.txt, checkpoints/0 (the weights and a fresh optimizer
state; no input position, so training reads its input from the start) and import_config.py, the
config to train with: a run may not change model/data/optimizer/steps fields of its checkpoint, so
choose them here.
`model.dtype='auto'` is resolved for the backend this runs on; import on the training machine or
set --config.model.dtype. HF_DIR and WORKDIR may be local or gs:// (the config file --config reads
must be local: copy WORKDIR/import_config.py first).
"""
import json
import sys

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from mlm_jax import hf_bert
from mlm_jax import hf_modernbert
from mlm_jax import paths

# The reading and mapping live in the package (train.init_from uses them too); the names stay here.
HfImportError = hf_bert.HfImportError
read_hf_config, read_hf_weights, read_vocab = (hf_bert.read_hf_config, hf_bert.read_hf_weights,
                                               hf_bert.read_vocab)
our_params = hf_bert.our_params


def build_config(base, hf: dict, vocab_path: str, lowercase: bool, max_len: int,
                 dropout: float | None, attention_dropout: float | None):
  """`base` with the model section of the HF checkpoint and its WordPiece vocabulary."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict(base.to_dict())
  m = config.model
  if hf.get('model_type') == hf_modernbert.MODEL_TYPE:
    fields, _ = hf_modernbert.model_fields(hf)
    fields.update(max_len=max_len, extra_embeddings=ml_collections.ConfigDict())
    fields.update({k: v for k, v in (('dropout', dropout), ('attention_dropout', attention_dropout))
                   if v is not None})
    m.update(fields)
    config.data.update(tokenizer='wordpiece', vocab_path=vocab_path, lowercase=bool(lowercase))
    return config
  for theirs, ours in hf_bert.SHAPE_FIELDS.items():
    m[ours] = int(hf[theirs])
  m.max_len = max_len
  m.extra_embeddings = ml_collections.ConfigDict()
  m.layer_norm = 'post'
  m.layer_norm_eps = float(hf.get('layer_norm_eps', 1e-12))
  m.init_std = float(hf.get('initializer_range', 0.02))
  m.dropout = float(hf.get('hidden_dropout_prob', 0.1) if dropout is None else dropout)
  m.attention_dropout = float(hf.get('attention_probs_dropout_prob', 0.1)
                              if attention_dropout is None else attention_dropout)
  config.data.tokenizer = 'wordpiece'
  config.data.vocab_path = vocab_path
  config.data.lowercase = bool(lowercase)
  return config


def import_hf(hf_dir: str, workdir: str, base_config, max_len: int | None = None,
              dropout: float | None = None, attention_dropout: float | None = None) -> dict:
  """Writes the run directory; returns {'warnings', 'config' (resolved dict)}."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from mlm_jax import checkpoint as ckpt  # pylint: disable=import-outside-toplevel
  from mlm_jax import config as config_lib, data, optim, steps, train  # pylint: disable=import-outside-toplevel
  from mlm_jax import model as model_lib  # pylint: disable=import-outside-toplevel

  hf = hf_bert.read_json(epath.Path(hf_dir) / 'config.json')
  modern = hf.get('model_type') == hf_modernbert.MODEL_TYPE
  if modern:
    _, warnings = hf_modernbert.model_fields(hf)
  else:
    hf, warnings = read_hf_config(hf_dir)
  pieces, lowercase = read_vocab(hf_dir)
  vocab_size = int(hf['vocab_size'])
  if len(pieces) > vocab_size:
    raise HfImportError(f'the vocabulary has {len(pieces)} pieces, the model only {vocab_size} rows')
  if len(pieces) < vocab_size:  # padded embedding tables: fill the rows no piece maps to
    warnings.append(f'vocabulary padded from {len(pieces)} to the model\'s {vocab_size} rows')
    pieces = pieces + [f'[unused_row_{i}]' for i in range(len(pieces), vocab_size)]
  max_len = int(hf['max_position_embeddings']) if max_len is None else max_len
  weights = read_hf_weights(hf_dir)
  params, unused = (hf_modernbert.our_params(weights, hf) if modern
                    else our_params(weights, hf, max_len))
  if unused:
    warnings.append(f'ignored {len(unused)} tensors without a slot in our model: {unused[:5]}')

  workdir = epath.Path(paths.absolute(workdir))  # local or gs://
  if (workdir / 'checkpoints').is_dir() and any((workdir / 'checkpoints').iterdir()):
    raise HfImportError(f'{workdir} already has checkpoints; import into a new directory')
  workdir.mkdir(parents=True, exist_ok=True)
  vocab_path = str(workdir / 'vocab.txt')
  paths.write_atomic(vocab_path, '\n'.join(pieces) + '\n')
  config = build_config(base_config, hf, vocab_path, lowercase, max_len, dropout, attention_dropout)
  config_lib.validate(config)
  tokenizer = data.build_tokenizer(config)

  graphdef, abstract, cfg = train.build_model(config)
  nnx.replace_by_pure_dict(abstract, jax.tree.map(jax.numpy.asarray, params))
  state = steps.init_state(abstract, optim.make_optimizer(config), config.seed)
  resolved = config.to_dict()
  resolved['model']['dtype'] = cfg.dtype
  paths.write_json(workdir / 'config.json', resolved)
  tokenizer.save(workdir / 'tokenizer')
  paths.write_atomic(workdir / 'import_config.py', _CONFIG_TEMPLATE.format(
      hf_dir=paths.absolute(hf_dir), config=json.dumps(resolved, indent=2, sort_keys=True)))
  k = config.checkpoint
  checkpointer = ckpt.Checkpointer(str(workdir / 'checkpoints'), keep=k.keep,
                                   keep_best=k.keep_best, best_metric=k.best_metric,
                                   best_mode=k.best_mode, async_save=False)
  try:
    checkpointer.save(0, state, force=True, metadata={
        'config': resolved, 'step': 0, 'imported_from': paths.absolute(hf_dir),
        'param_counts': model_lib.count_params(state['params'])})
    checkpointer.wait()
  finally:
    checkpointer.close()
  return {'warnings': warnings, 'config': resolved}


_CONFIG_TEMPLATE = '''"""Written by tools/import_hf.py from {hf_dir}.

Continue pretraining with
  python -m mlm_jax.main --config=THIS_FILE --workdir=THE_RUN_DIR
Changing a model/data/optimizer/train.steps field here breaks the checkpoint's exact resume.
"""
import json

import ml_collections

_CONFIG = json.loads(r"""{config}""")


def get_config():
  return ml_collections.ConfigDict(_CONFIG)
'''


def define_flags():
  config_flags.DEFINE_config_file('config', None, 'Training config for data/optimizer/train '
                                  '(default: the base config).', lock_config=False)
  flags.DEFINE_integer('max_len', None, 'Positions to keep (default: max_position_embeddings).')
  flags.DEFINE_float('dropout', None, 'model.dropout (default: hidden_dropout_prob).')
  flags.DEFINE_float('attention_dropout', None,
                     'model.attention_dropout (default: attention_probs_dropout_prob).')


def main(argv):
  if len(argv) != 3:
    raise app.UsageError('usage: tools/import_hf.py HF_DIR WORKDIR [--config=...]')
  f = flags.FLAGS
  if not f['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  from mlm_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from mlm_jax.errors import ConfigError, DataError  # pylint: disable=import-outside-toplevel
  base = f.config if f.config is not None else config_lib.base_config()
  try:
    result = import_hf(argv[1], argv[2], base, f.max_len, f.dropout, f.attention_dropout)
  except (HfImportError, ConfigError, DataError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  for w in result['warnings']:
    print(f'warning: {w}', file=sys.stderr)
  workdir = paths.absolute(argv[2])
  print(f'imported {argv[1]} into {workdir}; continue pretraining with\n'
        f'  python -m mlm_jax.main --config={workdir}/import_config.py --workdir={workdir}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
