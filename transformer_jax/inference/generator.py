"""Text generation with a trained language model: ``Generator``, ``make_generate_fn``.

``make_generate_fn`` builds the pure ``generate(params, prompt_ids, rng)`` (the model's
``init_decoding`` reads the prompt through the KV cache, then ``decoding.sample``);
``Generator`` wraps it with the tokenizer and compiles once per prompt shape.
``transformer_jax.inference.load`` returns a ``Generator`` for a run whose model does not
translate (a decoder-only LM).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transformer_jax import decoding
from transformer_jax.checkpoints import read_run
from transformer_jax.data.tokenizer import EOS_ID, Tokenizer
from transformer_jax.nn import ModelDef, split_model

__all__ = ["Generator", "make_generate_fn"]


def make_generate_fn(model_def: ModelDef, *, max_new_tokens: int, temperature: float = 1.0,
                     top_k: int = 0, top_p: float = 1.0, eos_id: int = EOS_ID):
    """Jitted ``generate(params, prompt_ids [B, P], rng) -> ids [B, max_new_tokens]``.

    The model's ``init_decoding`` reads the prompt: a decoder-only LM, trained on
    ``shift_right(targets)``, feeds ``[BOS, p_1 .. p_{k-1}]`` of a prompt ``p_1 .. p_k``
    through the model once (one parallel pass that fills the KV cache) and sampling starts
    from ``p_k``; an empty prompt starts from BOS.

    All prompts of a batch have the same length P >= 0 (no padding: rows decode in lockstep
    over one cache index). The output holds the sampled continuation, its EOS, then pad (0).
    ``temperature=0`` is greedy. With learned positions, ``P + max_new_tokens`` must not
    exceed ``model.max_len``.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")

    def generate(params, prompt_ids, rng):
        model = model_def.merge(params)
        prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
        cache, start_ids = model.init_decoding(prompt_ids, max_new_tokens)

        def tokens_to_logits(ids, cache):  # ids [B, 1]
            logits, cache = model.decode(ids, cache=cache)  # [B, 1, V]
            return logits[:, 0, :], cache

        return decoding.sample(
            cache, tokens_to_logits, rng, batch_size=prompt_ids.shape[0],
            max_len=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            eos_id=eos_id, start_ids=start_ids)

    return jax.jit(generate)


class Generator:
    """A decoder-only LM, its parameters and its tokenizer, ready to continue prompts.

    Args:
      model: a language model such as ``nn.DecoderOnlyLM`` (concrete, or abstract when
        ``params`` is given).
      tokenizer: the ``Tokenizer`` the model was trained with.
      params: parameter dict; default: the model's own.
    """

    def __init__(self, model, tokenizer: Tokenizer, *, params=None):
        self.config = model.config
        self.model_def, own = split_model(model)
        self.params = jax.device_put(own if params is None else params, jax.local_devices()[0])
        self.tokenizer = tokenizer
        self.step: int | None = None  # checkpoint step when loaded from a workdir

    @classmethod
    def from_workdir(cls, workdir: str, *, step: int | None = None,
                     averaged: bool = False) -> Generator:
        """Load tokenizer, model config and params of a language-model training run."""
        run = read_run(workdir, step, averaged)
        if run["model"].translates:
            raise ValueError(
                f"the run in {workdir} trained a {type(run['model']).__name__}, a translation "
                "model; load it with transformer_jax.inference.load (a Translator)."
            )
        generator = cls(run["model"], run["tokenizer"], params=run["params"])
        generator.step = run["step"]
        return generator

    @property
    def model(self) -> nnx.Module:
        """The model with this generator's parameters (a new module on each access)."""
        return self.model_def.merge(self.params)

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 32,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0) -> list[str]:
        """Continuations of ``prompts`` (same order; ``temperature=0`` is greedy)."""
        if isinstance(prompts, str):
            raise TypeError("generate takes a list of prompts; wrap a single one in [].")
        fn = make_generate_fn(self.model_def, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_k=top_k, top_p=top_p)
        ids = self.tokenizer.encode(list(prompts)) if prompts else []
        outputs = [""] * len(ids)
        for length in sorted({len(row) for row in ids}):  # one batch per prompt length
            rows = [i for i, row in enumerate(ids) if len(row) == length]
            prompt = np.asarray([ids[i] for i in rows], np.int32).reshape(len(rows), length)
            out = fn(self.params, jnp.asarray(prompt), jax.random.key(seed))
            for i, text in zip(rows, self.tokenizer.decode(np.asarray(out)), strict=True):
                outputs[i] = text
        return outputs
