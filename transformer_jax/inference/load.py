"""``load(workdir)``: the trained model of a work directory, ready to use, in one call."""

from __future__ import annotations

from transformer_jax.checkpoints import read_run
from transformer_jax.data.preprocess import source_transform
from transformer_jax.inference.generator import Generator
from transformer_jax.inference.translator import Translator

__all__ = ["load"]


def load(workdir: str, *, step: int | None = None, averaged: bool = False,
         **kwargs) -> Translator | Generator:
    """The trained model of a work directory, ready to use, in one call.

    Returns a :class:`Translator` when the run's model translates (encoder-decoder:
    ``translate``, ``attention``) and a :class:`Generator` otherwise (a language model:
    ``generate``); both carry ``model``, ``params``, ``tokenizer``, ``config`` and ``step``.

    Args:
      workdir: the run's ``--workdir``.
      step: checkpoint step (default: the newest).
      averaged: use ``<workdir>/averaged`` (checkpoint averaging) instead.
      **kwargs: forwarded to ``Translator`` (``max_source_length`` ...).
    """
    run = read_run(workdir, step, averaged)
    if run["model"].translates:
        kwargs.setdefault("normalize", source_transform(run["data"]))
        loaded = Translator(run["model"], run["tokenizer"], params=run["params"], **kwargs)
    else:
        loaded = Generator(run["model"], run["tokenizer"], params=run["params"])
    loaded.step = run["step"]
    return loaded
