"""Text generation from a decoder-only language model: prefill the prompt, then sample.

The LM is trained on ``shift_right(targets)``: position 0 holds the BOS (pad id 0) and every
later position the previous token. Continuing a prompt ``p_1 .. p_k`` therefore feeds
``[BOS, p_1 .. p_{k-1}]`` through the model once (one parallel pass that fills the KV cache)
and starts ``decoding.sample`` from ``p_k``; an empty prompt starts from the BOS.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from transformer_jax import decoding
from transformer_jax.data.tokenizer import EOS_ID
from transformer_jax.training.step import ModelDef

__all__ = ["make_generate_fn"]


def make_generate_fn(model_def: ModelDef, *, max_new_tokens: int, temperature: float = 1.0,
                     top_k: int = 0, top_p: float = 1.0, eos_id: int = EOS_ID):
    """Jitted ``generate(params, prompt_ids [B, P], rng) -> ids [B, max_new_tokens]``.

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
        batch, prompt_len = prompt_ids.shape
        cache = model.init_cache(batch, prompt_len + max_new_tokens)
        start_ids = None
        if prompt_len:
            bos = jnp.zeros((batch, 1), jnp.int32)
            prefill = jnp.concatenate([bos, prompt_ids[:, :-1]], axis=1)  # [B, P]
            _, cache = model.decode(prefill, cache)
            start_ids = prompt_ids[:, -1]  # [B]

        def tokens_to_logits(ids, cache):  # ids [B, 1]
            logits, cache = model.decode(ids, cache)  # [B, 1, V]
            return logits[:, 0, :], cache

        return decoding.sample(
            cache, tokens_to_logits, rng, batch_size=batch, max_len=max_new_tokens,
            temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
            start_ids=start_ids)

    return jax.jit(generate)
