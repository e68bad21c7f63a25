"""DomainBERT: a BERT-base-shaped MLM over the characters of domain names, with a TLD embedding.

  python -m mlm_jax.main --config=configs/domainbert.py --workdir=runs/domainbert \
      --config.data.train_files=names.txt          # one name per line (or CSV: data.domain_column)
  python -m mlm_jax.main --config=configs/domainbert.py:tiny --workdir=runs/domainbert_tiny

Each name is split at its public suffix (ICANN section of the bundled Public Suffix List): the model
reads the registrable label ('example' of 'www.example.co.uk'; data.domain_part='host' reads
'www.example') one character at a time, and the suffix ('co.uk') enters as a per-record id in the
'tld' embedding (the data.tld_vocab_size - 2 most frequent suffixes of the training split; the rest
share an 'other' id). The TLD vocabulary is saved with the tokenizer in WORKDIR/tokenizer.
Validation: a deterministic 0.1% of the names, stratified by suffix.

Default data: the 3,435 names shipped in mlm_jax/assets/domains (MPL-2.0) -- enough to check the
setup, far too few to pre-train the full model; point data.train_files at your own list.
Hardware-aware defaults, picked by the trainer once JAX has started (never at config time, so a
multi-host run can start jax.distributed first): train.batch_size='auto' is 128 on GPU/TPU, 16 on
CPU; model.dtype='auto' computes in bfloat16 on GPU/TPU and float32 on CPU. Override either on the
command line. Variants: ':tiny' (L4/H256, trains on a laptop CPU in minutes; input in the training
process), ':small' (L6/H512).
"""
from mlm_jax.config import base_config
from mlm_jax.data.config import DOMAIN_ALPHABET

_SHAPES = {
    '': dict(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072),
    'small': dict(num_layers=6, hidden_size=512, num_heads=8, intermediate_size=2048),
    'tiny': dict(num_layers=4, hidden_size=256, num_heads=4, intermediate_size=1024),
}


def get_config(variant: str = ''):
  if variant not in _SHAPES:
    raise ValueError(f'unknown variant {variant!r} (known: tiny, small)')
  tld_vocab_size = 512
  c = base_config()
  c.model.update(**_SHAPES[variant], vocab_size=5 + len(DOMAIN_ALPHABET), max_len=64,
                 dropout=0.1, layer_norm='post', dtype='auto')
  c.model.extra_embeddings = {'tld': tld_vocab_size}
  c.data.update(
      source='domains', train_files='{assets}/domains/psl_private_domains.txt', eval_files='',
      domain_part='registrable', domain_column='', tld_vocab_size=tld_vocab_size,
      tokenizer='char', alphabet=DOMAIN_ALPHABET, lowercase=True,
      eval_fraction=0.001, stratify_field='tld',
      # ~6 names per 64-token row; short records want big chunks (packing happens within one).
      packing=True, long_records='truncate', chunk_records=16384,
      # Every packed name gets at least one masked character, so rows hold more than 15% of 64:
      # at most 14 on the shipped list (auto would give 12).
      max_predictions=16,
      num_workers=2)
  c.optimizer.update(learning_rate=1e-4, warmup_steps=10_000, schedule='linear', weight_decay=0.01)
  c.train.update(steps=500_000, batch_size='auto', log_every=100,
                 eval_every=5_000, eval_steps=-1)
  c.checkpoint.update(every=5_000, keep=3)
  if variant == 'small':
    c.optimizer.update(learning_rate=3e-4, warmup_steps=2_000)
    c.train.update(steps=100_000)
  if variant == 'tiny':
    # Sized for a CPU: ~1,000 steps of 32 rows (~190k names) in well under 20 minutes.
    c.data.update(eval_fraction=0.02, chunk_records=4096, num_workers=0)
    c.optimizer.update(learning_rate=1e-3, warmup_steps=100, schedule='cosine', end_lr_ratio=0.05)
    c.train.update(steps=1_000, batch_size=32, log_every=50, eval_every=250, eval_steps=-1)
    c.checkpoint.update(every=250, keep=2)
  return c
