"""Event-session BERT: an MLM over shopping sessions (typed events with text), with event-type
embeddings and structural/text token types.

  python tools/make_event_sessions.py --out /tmp/sessions.jsonl --sessions 20000 --seed 0
  python -m mlm_jax.main --config=configs/event_bert.py --workdir=runs/event_bert \
      --config.data.train_files=/tmp/sessions.jsonl

Input format (one session per line; see mlm_jax/data/events.py):
  {"session_id": "s1", "events": [{"type": "search", "text": "wireless headphones"}, ...]}
Tokens: [CLS] [E:search] wireless headphones [E:view] ... [SEP]; [E:type] tokens are structural
(token type 0, never masked), text pieces are WordPiece ids shifted past the structural vocabulary
(token type 1). Feature 'event_type' gives each token its event's type (1..len(types), 0 = padding).
The default vocabulary (mlm_jax/assets/events/vocab.txt, 1,024 pieces) was trained on generated
sessions; for real data train one on your event texts (tools/train_tokenizer.py) and set
data.vocab_path and model.vocab_size (= 5 + number of event types + vocab lines).
"""
import os

from mlm_jax.config import base_config
from mlm_jax.data import config as data_config
from mlm_jax.data import events

VOCAB = '{assets}/events/vocab.txt'


def _lines(path):
  with open(data_config.expand_path(path), encoding='utf-8') as f:
    return sum(1 for _ in f)


def get_config(variant: str = ''):
  if variant:
    raise ValueError(f'unknown variant {variant!r} (there are none)')
  c = base_config()
  event_types = 'search,view,add_to_cart,purchase'
  n_types = len(events.types(event_types))
  c.model.update(num_layers=4, hidden_size=256, num_heads=4, intermediate_size=1024,
                 vocab_size=5 + n_types + _lines(VOCAB), max_len=128, type_vocab_size=2,
                 dropout=0.1)
  c.model.extra_embeddings = {'event_type': n_types + 1}
  c.data.update(source='events', tokenizer='session', vocab_path=VOCAB, event_types=event_types,
                text_field='events', train_files='', eval_files='', eval_fraction=0.05,
                # long sessions are cut into windows; short ones share rows (packing), each in
                # its own segment (attention never crosses segments).
                long_records='window', packing=True, chunk_records=1024)
  c.optimizer.update(learning_rate=1e-3, warmup_steps=200, schedule='cosine', end_lr_ratio=0.05)
  c.train.update(steps=5_000, batch_size=32, log_every=50, eval_every=500, eval_steps=-1)
  c.checkpoint.update(every=500, keep=2)
  return c
