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

The names below are imported on first use (PEP 562), so importing one light module of the
package (``data.tokenizer``, ``data.preprocess``, ``data.validation``: what translation
needs) does not import grain and TensorFlow Datasets (seconds of start-up).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on demand
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

# public name -> the module of this package that defines it
_HOMES = {
    "BATCH_KEYS": "pipeline",
    "DataError": "validation",
    "EOS_ID": "tokenizer",
    "PAD_ID": "tokenizer",
    "PairSource": "sources",
    "PipelineStats": "pipeline",
    "Prepared": "pipeline",
    "Tokenizer": "tokenizer",
    "UNK_ID": "tokenizer",
    "check_data_config": "config",
    "default_data_config": "config",
    "eval_batches": "pipeline",
    "load_raw_pairs": "sources",
    "load_split": "sources",
    "merge_states": "streams",
    "prepare": "pipeline",
    "raw_pairs": "pipeline",
    "train_iterator": "pipeline",
}

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


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
