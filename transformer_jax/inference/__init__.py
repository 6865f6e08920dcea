"""Use a trained model: translate, generate, score translations and look at attention.

One call loads a training work directory (model, params and tokenizer, ready to use)::

    from transformer_jax.inference import load

    translator = load("runs/demo")                  # a Translator (translation runs)
    translator.translate(["one hundred and five", ""], beam_size=4, alpha=0.6)
    # -> ["hundertfünf", ""]
    translator.model, translator.params, translator.tokenizer, translator.config
    lm = load("runs/lm")                            # a Generator (language-model runs)
    lm.generate(["drei"], max_new_tokens=8)

``load(workdir, averaged=True)`` reads ``<workdir>/averaged``; ``step=`` picks a checkpoint.

Scores (sacrebleu, never hand-written; defined in ``transformer_jax.metrics``)::

    corpus_scores(hyps, refs, ("bleu", "chrf", "exact_match"))   # {"bleu": 27.1, ...}, 0-100
    bleu(hyps, refs), chrf(hyps, refs)

Compiled building blocks: ``make_translate_fn`` (greedy / beam search) and
``make_generate_fn`` (sampling), both pure functions of ``params`` over any model's
``init_decoding`` / ``decode`` (``nn.model``). Modules: ``translator`` (Translator, attention
maps), ``generator`` (Generator), ``load``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from transformer_jax.inference.generator import Generator, make_generate_fn
from transformer_jax.inference.load import load
from transformer_jax.inference.translator import (
    EXTRA_LENGTH,
    Translator,
    attention_maps,
    make_translate_fn,
)

if TYPE_CHECKING:
    from transformer_jax.metrics import bleu, chrf, corpus_scores

# sacrebleu is imported on first use of a score (PEP 562): translating needs none
_LAZY = {"bleu": "transformer_jax.metrics", "chrf": "transformer_jax.metrics",
         "corpus_scores": "transformer_jax.metrics"}

__all__ = [
    "EXTRA_LENGTH",
    "Generator",
    "Translator",
    "attention_maps",
    "bleu",
    "chrf",
    "corpus_scores",
    "load",
    "make_generate_fn",
    "make_translate_fn",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
