"""Input pipeline: sources -> split -> tokenize -> window/pack -> mask -> batches (numpy only).

Never imports jax, so grain worker processes stay light. See API.md for the batch layout.
"""
from mlm_jax.data.config import defaults, max_predictions, validate
from mlm_jax.data.pipeline import (BATCH_KEYS, build_tokenizer, eval_batches, split_records,
                                   train_iterator)
from mlm_jax.data.registry import load_tokenizer
from mlm_jax.data.stats import Stats
from mlm_jax.data.tokenizers import CharTokenizer, Tokenizer, WordPieceTokenizer

__all__ = [
    'BATCH_KEYS', 'CharTokenizer', 'Stats', 'Tokenizer', 'WordPieceTokenizer', 'build_tokenizer',
    'defaults', 'eval_batches', 'load_tokenizer', 'max_predictions', 'split_records',
    'train_iterator', 'validate',
]
