"""Data layer: TFDS sources, SentencePiece tokenizer and grain pipelines.

Typical use by a training loop::

    from transformer_jax import data

    prepared = data.prepare(config.data, workdir)          # dataset + tokenizer, once
    train_it = data.train_iterator(prepared, batch_size=64, seed=0)
    batch = next(train_it)                                  # dict of int32 [rows, max_length]
    state = train_it.get_state()     # JSON-serialisable, global: restores on any process count
    for batch in data.eval_batches(prepared, config.data.eval_split, batch_size=64):
        ...                                                 # batch["index"]: example or -1
    references = data.raw_pairs(prepared, config.data.eval_split)
"""

from transformer_jax.data.config import check_data_config, default_data_config
from transformer_jax.data.pipeline import (
    BATCH_KEYS,
    PipelineStats,
    Prepared,
    eval_batches,
    prepare,
    raw_pairs,
    train_iterator,
)
from transformer_jax.data.sources import PairSource, load_raw_pairs, load_split
from transformer_jax.data.streams import merge_states
from transformer_jax.data.tokenizer import EOS_ID, PAD_ID, UNK_ID, Tokenizer
from transformer_jax.data.validation import DataError

__all__ = [
    "BATCH_KEYS",
    "DataError",
    "EOS_ID",
    "PAD_ID",
    "PairSource",
    "PipelineStats",
    "Prepared",
    "Tokenizer",
    "UNK_ID",
    "check_data_config",
    "default_data_config",
    "eval_batches",
    "load_raw_pairs",
    "load_split",
    "merge_states",
    "prepare",
    "raw_pairs",
    "train_iterator",
]
