"""Autoregressive search: greedy, beam search and sampling over an explicit cache.

Search knows nothing of the model. It is driven by a closure

    tokens_to_logits(ids [B', 1] int32, cache) -> (logits [B', V], new_cache)

that runs one decoder step at the cache's current position. Every function here is pure and
``jax.jit``-able (the loops are ``lax.while_loop``); the encoder runs once, outside, when the
caller builds the cache (see ``Transformer.init_cache(..., encoded=...)``).

Conventions shared by all searches:

* Output ids are ``[B, max_len]``: generated tokens, the EOS, then ``pad_id`` (0).
* Decoding starts from ``start_ids`` (default ``bos_id`` = 0, the decoder's BOS).
* ``max_lengths [B]`` (optional, clipped to ``[1, max_len]``) caps every example's output,
  EOS included: at position ``max_lengths[b] - 1`` only EOS may be chosen (as fairseq does),
  so every output ends with EOS. The paper's limit is "input length + 50".
* ``pad_id`` is never chosen (unless it equals ``eos_id``). Greedy search and sampling mask
  with ``-inf``, so no temperature can lift a masked token above a forced EOS; beam search
  adds log-probabilities and masks with the finite ``NEG_INF``.
* The loop stops early once every example has finished.
* ``forbid_ids`` lists further token ids that are never chosen (masked like PAD, after
  normalisation).
* ``min_len`` (default 0) is the shortest output, EOS included: EOS is masked before position
  ``min_len - 1`` unless ``max_lengths`` forces it there (``min_len == max_len`` gives every
  example exactly ``max_len`` tokens, as benchmarks need).
* ``beam_search(convention="huggingface")`` reproduces transformers' ``generate()`` (see there);
  the default "gnmt" is the paper's.
* Cache leaves with a leading batch axis are expanded/reordered for beams; scalar leaves (the
  per-layer ``index``) are shared by all rows because all rows decode in lockstep.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "NEG_INF",
    "BeamState",
    "beam_search",
    "check_alpha",
    "expand_for_beam",
    "gather_beams",
    "greedy_search",
    "length_penalty",
    "sample",
]

NEG_INF = -1.0e7  # large but finite, so that NEG_INF + log p never becomes NaN

TokensToLogits = Callable[[jax.Array, Any], tuple[jax.Array, Any]]


CONVENTIONS = ("gnmt", "huggingface")


def length_penalty(length, alpha: float, convention: str = "gnmt") -> jax.Array:
    """GNMT length penalty ``((5 + length) / 6) ** alpha`` (Wu et al. 2016), or
    ``length ** alpha`` for ``convention="huggingface"`` (transformers, fairseq)."""
    length = jnp.asarray(length, jnp.float32)
    if convention == "huggingface":
        return length**alpha
    return ((5.0 + length) / 6.0) ** alpha



def check_alpha(alpha) -> None:
    """A length penalty must be a finite number (NaN or inf scores make the winner arbitrary);
    traced values are not checked."""
    if isinstance(alpha, jax.core.Tracer):
        return
    if not math.isfinite(float(alpha)):
        raise ValueError(f"the length penalty alpha={float(alpha)} is not a finite number; "
                         "give a finite alpha such as 0.6.")


def _max_lengths(max_lengths, batch_size: int, max_len: int) -> jax.Array:
    if max_lengths is None:
        return jnp.full((batch_size,), max_len, jnp.int32)
    max_lengths = jnp.asarray(max_lengths, jnp.int32)
    if max_lengths.shape != (batch_size,):
        raise ValueError(
            f"max_lengths must have shape ({batch_size},) (one per example); got "
            f"{tuple(max_lengths.shape)}."
        )
    return jnp.clip(max_lengths, 1, max_len)


def _start_ids(start_ids, batch_size: int, bos_id: int) -> jax.Array:
    if start_ids is None:
        return jnp.full((batch_size,), bos_id, jnp.int32)
    start_ids = jnp.asarray(start_ids, jnp.int32)
    if start_ids.shape != (batch_size,):
        raise ValueError(
            f"start_ids must have shape ({batch_size},); got {tuple(start_ids.shape)}."
        )
    return start_ids


def _mask_logits(logits, step, max_lengths, eos_id: int, pad_id: int, fill, forbid_ids=(),
                 eos_value=None, min_len: int = 0) -> jax.Array:
    """Sets ``fill`` where a token may not be chosen.  logits [B, V].

    PAD is never generated (it is no training target, and an output row reads "tokens, EOS,
    then PAD") and neither are ``forbid_ids``; rows at their last allowed position may only
    choose EOS (scored ``eos_value`` when given, as transformers' forced EOS is); before
    position ``min_len - 1`` EOS is not chosen (unless forced).
    """
    vocab = jnp.arange(logits.shape[-1])  # [V]
    last = (step >= max_lengths - 1)[:, None]  # [B, 1]
    banned = (last & (vocab != eos_id)) | ((vocab == pad_id) & (pad_id != eos_id))  # [B, V]
    if min_len > 1:
        banned = banned | ((step < min_len - 1) & ~last & (vocab == eos_id))
    if forbid_ids:
        banned = banned | jnp.isin(vocab, jnp.asarray(forbid_ids))
    if eos_value is not None:
        logits = jnp.where(last & (vocab == eos_id), eos_value, logits)
    return jnp.where(banned, fill, logits)


def _check_cache(cache, rows: int, beam_rows: int | None = None) -> None:
    """Every non-scalar leaf leads with ``rows`` (or ``beam_rows``, when given)."""
    allowed = {rows} if beam_rows is None else {rows, beam_rows}
    for path, leaf in jax.tree_util.tree_leaves_with_path(cache):
        if jnp.ndim(leaf) > 0 and jnp.shape(leaf)[0] not in allowed:
            raise ValueError(
                f"cache leaf {jax.tree_util.keystr(path)} has shape {tuple(jnp.shape(leaf))}; "
                f"every non-scalar cache leaf must lead with the batch size {rows}"
                + ("." if beam_rows is None else f" or the beam rows {beam_rows}.")
            )


def _check_logits(logits, rows: int) -> None:
    if logits.ndim != 2 or logits.shape[0] != rows:
        raise ValueError(
            f"tokens_to_logits must return logits [{rows}, V]; got {tuple(logits.shape)}. "
            "Squeeze the length axis of a [B, 1, V] decoder output."
        )


# ---------------------------------------------------------------------- greedy and sampling


def _decode_loop(cache, tokens_to_logits: TokensToLogits, choose, rng, *, batch_size: int,
                 max_len: int, eos_id: int, bos_id: int, pad_id: int, max_lengths, start_ids,
                 forbid_ids=(), min_len: int = 0):
    """One token per example and step; ``choose(logits [B, V], rng) -> ids [B]``."""
    max_lengths = _max_lengths(max_lengths, batch_size, max_len)
    first = _start_ids(start_ids, batch_size, bos_id)

    def cond(carry):
        step, _, _, _, finished, _ = carry
        return (step < max_len) & ~jnp.all(finished)

    def body(carry):
        step, out, last, cache, finished, rng = carry
        rng, step_rng = jax.random.split(rng)
        logits, cache = tokens_to_logits(last[:, None], cache)  # [B, V]
        _check_logits(logits, batch_size)
        logits = _mask_logits(logits.astype(jnp.float32), step, max_lengths, eos_id, pad_id,
                              -jnp.inf, forbid_ids, min_len=min_len)
        token = choose(logits, step_rng).astype(jnp.int32)  # [B]
        token = jnp.where(finished, pad_id, token)
        out = lax.dynamic_update_slice(out, token[:, None], (0, step))
        finished = finished | (token == eos_id)
        return step + 1, out, token, cache, finished, rng

    out = jnp.full((batch_size, max_len), pad_id, jnp.int32)
    carry = (jnp.int32(0), out, first, cache, jnp.zeros((batch_size,), bool), rng)
    return lax.while_loop(cond, body, carry)[1]


def greedy_search(cache, tokens_to_logits: TokensToLogits, *, batch_size: int, max_len: int,
                  eos_id: int = 1, bos_id: int = 0, pad_id: int = 0, max_lengths=None,
                  start_ids=None, forbid_ids=(), min_len: int = 0) -> jax.Array:
    """Argmax decoding.

    Args:
      cache: decoding cache for ``batch_size`` rows.
      tokens_to_logits: ``(ids [B, 1], cache) -> (logits [B, V], cache)``.
      batch_size: B.
      max_len: length of the output buffer (and of the cache it may write).
      eos_id, bos_id, pad_id: special ids.
      max_lengths: optional ``[B]`` per-example caps (EOS included).
      start_ids: optional ``[B]`` first decoder inputs (default ``bos_id``).
      forbid_ids: token ids never chosen (e.g. ``(pad_id,)``).
      min_len: shortest output, EOS included (EOS masked before position ``min_len - 1``).

    Returns:
      ``[B, max_len]`` int32 ids: tokens, EOS, then ``pad_id``.
    """
    return _decode_loop(
        cache, tokens_to_logits, lambda logits, _: jnp.argmax(logits, axis=-1),
        jax.random.key(0), batch_size=batch_size, max_len=max_len, eos_id=eos_id,
        bos_id=bos_id, pad_id=pad_id, max_lengths=max_lengths, start_ids=start_ids,
        forbid_ids=tuple(forbid_ids), min_len=int(min_len))


def _filter_logits(logits, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Temperature, top-k and nucleus (top-p) filtering of ``logits [B, V]`` (masked already).

    The best allowed logit is shifted to 0 before the division, so no temperature overflows
    it: at a tiny temperature every other token goes to -inf and the argmax remains. Masked
    entries are -inf and stay -inf whatever the temperature; so is what we filter.
    """
    logits = logits - jnp.max(logits, axis=-1, keepdims=True)  # best allowed: 0
    logits = logits / temperature
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)  # [B, V]
        # keep the smallest prefix whose mass reaches top_p: every token whose predecessors
        # hold less than top_p (the most likely token always survives)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # [B, V]
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def sample(cache, tokens_to_logits: TokensToLogits, rng, *, batch_size: int, max_len: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_id: int = 1,
           bos_id: int = 0, pad_id: int = 0, max_lengths=None, start_ids=None) -> jax.Array:
    """Ancestral sampling with temperature, top-k and nucleus (top-p) filtering.

    ``temperature == 0`` or ``top_k == 1`` is greedy decoding. ``top_k = 0`` and
    ``top_p = 1`` disable those filters. Arguments and result as in :func:`greedy_search`,
    plus ``rng``, a PRNG key (split once per step).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0; got {temperature}.")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p}.")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it); got {top_k}.")

    def choose(logits, key):
        if temperature == 0.0 or top_k == 1:
            return jnp.argmax(logits, axis=-1)
        return jax.random.categorical(key, _filter_logits(logits, temperature, top_k, top_p))

    return _decode_loop(
        cache, tokens_to_logits, choose, rng, batch_size=batch_size, max_len=max_len,
        eos_id=eos_id, bos_id=bos_id, pad_id=pad_id, max_lengths=max_lengths,
        start_ids=start_ids)


# ------------------------------------------------------------------------------ beam search


def expand_for_beam(tree, beam_size: int):
    """Repeat every batch-leading leaf ``[B, ...] -> [B * beam_size, ...]`` (rows b*K..b*K+K-1).

    Scalar leaves (cache indices) are returned unchanged.
    """
    def expand(x):
        if jnp.ndim(x) == 0:
            return x
        return jnp.repeat(x, beam_size, axis=0)

    return jax.tree_util.tree_map(expand, tree)


def gather_beams(tree, beam_indices, batch_size: int, beam_size: int):
    """Reorder the beams of flat ``[B * K, ...]`` leaves by ``beam_indices [B, K]``."""
    def gather(x):
        if jnp.ndim(x) == 0:
            return x
        x = x.reshape((batch_size, beam_size) + x.shape[1:])  # [B, K, ...]
        x = jnp.take_along_axis(
            x, beam_indices.reshape(beam_indices.shape + (1,) * (x.ndim - 2)), axis=1)
        return x.reshape((batch_size * beam_size,) + x.shape[2:])

    return jax.tree_util.tree_map(gather, tree)


def _reorder_cache(old, new, beam_indices, batch_size: int, beam_size: int):
    """``gather_beams`` on the leaves of ``new`` that ``tokens_to_logits`` changed and that
    lead with ``B * K`` (one row per beam).

    A leaf passed through unchanged (e.g. cross-attention keys/values projected once) still
    holds what ``expand_for_beam`` copied into every beam of an example, so reordering it
    would be a no-op; skipping it saves a full copy per step. Leaves that lead with B are one
    per example (a model's beam cache, see :func:`beam_search`) and are not reordered.
    """
    rows = batch_size * beam_size

    def reorder(o, n):
        if n is o or jnp.ndim(n) == 0 or (beam_size > 1 and jnp.shape(n)[0] != rows):
            return n
        return gather_beams(n, beam_indices, batch_size, beam_size)

    old_leaves, old_def = jax.tree_util.tree_flatten(old)
    new_leaves, new_def = jax.tree_util.tree_flatten(new)
    if old_def != new_def:
        old_leaves = [None] * len(new_leaves)
    leaves = [reorder(o, n) for o, n in zip(old_leaves, new_leaves, strict=True)]
    return jax.tree_util.tree_unflatten(new_def, leaves)


class BeamState(NamedTuple):
    """Loop state of :func:`beam_search` (a pytree; B batch, K beams, L = ``max_len``).

    Live beams are still growing; finished ones ended with EOS and carry their
    length-penalised score. Row ``b * K + k`` of ``last`` and of the cache is beam ``k`` of
    example ``b``.
    """

    step: jax.Array  # int32 [], position being decoded
    live_seqs: jax.Array  # int32 [B, K, L], tokens so far, then pad
    live_logp: jax.Array  # float32 [B, K], log-probability of each live beam (best first)
    last: jax.Array  # int32 [B*K], each live beam's newest token (next decoder input)
    cache: Any  # decoding cache of B*K rows
    fin_scores: jax.Array  # float32 [B, K], length-penalised scores (NEG_INF: empty slot)
    fin_seqs: jax.Array  # int32 [B, K, L], finished hypotheses, EOS then pad
    done: jax.Array  # bool [B], example finished (used by the huggingface convention only)

    @classmethod
    def start(cls, first, cache, batch_size: int, beam_size: int, max_len: int,
              pad_id: int) -> BeamState:
        """Step 0: one live beam per example (the others at NEG_INF), nothing finished."""
        seqs = jnp.full((batch_size, beam_size, max_len), pad_id, jnp.int32)
        live_logp = jnp.array([0.0] + [NEG_INF] * (beam_size - 1), jnp.float32)
        return cls(step=jnp.int32(0), live_seqs=seqs,
                   live_logp=jnp.tile(live_logp, (batch_size, 1)), last=first, cache=cache,
                   fin_scores=jnp.full((batch_size, beam_size), NEG_INF, jnp.float32),
                   fin_seqs=seqs, done=jnp.zeros((batch_size,), bool))


def _beam_select(logprobs, state: BeamState, done, eos_id: int, penalty):
    """One beam-search step's choice.  logprobs [B, K, V] (masked), state before the step.

    Ranks the ``K * V`` continuations, takes the best ``2K``; EOS candidates among the best K
    join the finished set (best K kept), the best K others stay live. Returns ``(live_seqs
    [B, K, L], live_logp [B, K], fin_scores [B, K], fin_seqs [B, K, L], beams [B, K] (the
    live beam each new one extends), last [B*K] (its newest token))``.
    """
    B, K, vocab = logprobs.shape
    step = state.step
    cand = (state.live_logp[:, :, None] + logprobs).reshape(B, K * vocab)
    top_logp, top_idx = lax.top_k(cand, min(2 * K, K * vocab))  # [B, 2K] descending
    top_beam, top_token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    top_seqs = jnp.take_along_axis(state.live_seqs, top_beam[:, :, None], axis=1)  # [B, 2K, L]
    top_seqs = lax.dynamic_update_slice(top_seqs, top_token[:, :, None], (0, 0, step))
    # Candidates built on a masked (impossible) beam or token are never kept.
    possible = top_logp > NEG_INF / 2  # [B, 2K]
    is_eos = top_token == eos_id
    in_top_k = jnp.arange(top_logp.shape[1]) < K  # [2K]

    # Finished: merge the K old ones with the new EOS candidates, keep the best K.
    finishes = is_eos & possible & in_top_k & ~done[:, None]
    new_scores = jnp.where(finishes, top_logp / penalty(step + 1), NEG_INF)
    all_scores = jnp.concatenate([state.fin_scores, new_scores], axis=1)  # [B, 3K]
    all_seqs = jnp.concatenate([state.fin_seqs, top_seqs], axis=1)  # [B, 3K, L]
    fin_scores, keep = lax.top_k(all_scores, K)
    fin_seqs = jnp.take_along_axis(all_seqs, keep[:, :, None], axis=1)

    # Live: the best K candidates that did not end.
    live_logp, keep = lax.top_k(jnp.where(is_eos | ~possible, NEG_INF, top_logp), K)
    live_seqs = jnp.take_along_axis(top_seqs, keep[:, :, None], axis=1)  # [B, K, L]
    beams = jnp.take_along_axis(top_beam, keep, axis=1)  # [B, K] rows to follow
    last = jnp.take_along_axis(top_token, keep, axis=1).reshape(B * K)
    return live_seqs, live_logp, fin_scores, fin_seqs, beams, last


def beam_search(cache, tokens_to_logits: TokensToLogits, *, batch_size: int, beam_size: int,
                max_len: int, eos_id: int = 1, bos_id: int = 0, pad_id: int = 0,
                alpha: float = 0.6, max_lengths=None, start_ids=None, forbid_ids=(),
                convention: str = "gnmt", min_len: int = 0, beam_cache: bool = False):
    """Beam search with the GNMT length penalty (paper: beam 4, alpha 0.6).

    A finished hypothesis of ``n`` tokens (EOS included) with log-probability ``logp`` scores
    ``logp / ((5 + n) / 6) ** alpha``. Each step ranks the ``K * V`` continuations of the
    ``K`` live beams by log-probability and takes the best ``2K``: those ending in EOS *and
    ranked among the best K* join the finished set (best ``K`` kept, as fairseq and Hugging
    Face do, so ``beam_size=1, alpha=0`` is exactly greedy search); the best ``K`` that do not
    end stay live and the cache rows are reordered to follow them (leaves that
    ``tokens_to_logits`` returns unchanged are skipped: every beam of an example holds the
    same copy). An example is done when it has ``K`` finished hypotheses and no live beam can
    still beat the worst of them (a live beam's log-probability only falls, so its best
    reachable score is ``logp`` divided by the largest penalty among the lengths it can still
    finish at).

    Args:
      cache: decoding cache for ``batch_size`` rows (every non-scalar leaf leads with B);
        expanded to ``batch_size * beam_size`` rows here, so ``tokens_to_logits`` sees
        ``[B * K, 1]`` ids, beam ``k`` of example ``b`` in row ``b * K + k``.
      tokens_to_logits: ``(ids [B*K, 1], cache) -> (logits [B*K, V], cache)``.
      batch_size, beam_size, max_len: B, K and the output length.
      alpha: length-penalty exponent (0 = plain log-probability).
      eos_id, bos_id, pad_id, max_lengths, start_ids, forbid_ids, min_len: as in
        :func:`greedy_search`.
      convention: "gnmt" (above) or "huggingface", the search of transformers' ``generate()``
        with ``num_beams=K, length_penalty=alpha, early_stopping=False,
        forced_eos_token_id=eos_id``: finished hypotheses score ``logp / n ** alpha``, the
        EOS forced at the last position adds log-probability 0, and an example stops (and
        takes no more hypotheses) once it has K finished ones and its best live beam
        ``logp / n ** alpha`` at the current length ``n`` does not beat the worst of them.
      beam_cache: the cache already serves the ``B * K`` rows (a model's
        ``init_decoding(..., beams=K)``) and is not expanded: leaves that lead with ``B * K``
        are one per beam and follow the beams; leaves that lead with B are one per example,
        shared by its beams and never reordered (a model's beam cache keeps its keys there
        and reorders only a small per-row index of them).

    Returns:
      ``(sequences [B, K, max_len] int32, scores [B, K] float32)``, best first. Sequences are
      tokens, EOS, then ``pad_id``. Slots that no hypothesis could fill (a vocabulary too
      small for ``K`` distinct hypotheses) score ``NEG_INF`` or below.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1; got {beam_size}.")
    check_alpha(alpha)
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r} is unknown; use one of {CONVENTIONS}.")
    hf = convention == "huggingface"
    B, K = batch_size, beam_size
    _check_cache(cache, B, B * K if beam_cache else None)
    max_lengths = _max_lengths(max_lengths, B, max_len)
    first = jnp.repeat(_start_ids(start_ids, B, bos_id), K)  # [B*K]
    if not beam_cache:
        cache = expand_for_beam(cache, K)
    penalty = functools.partial(length_penalty, alpha=alpha, convention=convention)

    def best_live_possible(step, live_logp):  # [B]
        # gnmt: finishing lengths still open are step + 1 .. max_lengths; the penalty is
        # largest at the longest for alpha >= 0 and at the shortest for alpha < 0.
        # huggingface: transformers' heuristic, the current length.
        length = step if hf else (max_lengths if alpha >= 0 else step + 1)
        return live_logp[:, 0] / penalty(length)

    def is_done(step, live_logp, fin_scores):  # [B]
        worst_finished = jnp.min(fin_scores, axis=1)  # [B]; NEG_INF until K have finished
        return worst_finished >= best_live_possible(step, live_logp)

    def cond(state: BeamState):
        done = state.done if hf else is_done(state.step, state.live_logp, state.fin_scores)
        return (state.step < max_len) & ~jnp.all(done)

    def body(state: BeamState) -> BeamState:
        step, old_cache, done = state.step, state.cache, state.done
        logits, cache = tokens_to_logits(state.last[:, None], old_cache)  # [B*K, V]
        _check_logits(logits, B * K)
        vocab = logits.shape[-1]
        logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        logprobs = _mask_logits(logprobs, step, jnp.repeat(max_lengths, K), eos_id, pad_id,
                                NEG_INF, forbid_ids, eos_value=0.0 if hf else None,
                                min_len=min_len)
        live_seqs, live_logp, fin_scores, fin_seqs, beams, last = _beam_select(
            logprobs.reshape(B, K, vocab), state, done, eos_id, penalty)
        cache = _reorder_cache(old_cache, cache, beams, B, K)
        if hf:  # a finished example stays finished (transformers' sticky early stop)
            done = done | is_done(step + 1, live_logp, fin_scores)
        return BeamState(step + 1, live_seqs, live_logp, last, cache, fin_scores, fin_seqs,
                         done)

    final = lax.while_loop(cond, body, BeamState.start(first, cache, B, K, max_len, pad_id))
    live_seqs, live_logp = final.live_seqs, final.live_logp
    fin_scores, fin_seqs = final.fin_scores, final.fin_seqs
    # With forced EOS at max length every example finishes; live beams are a safety net
    # (e.g. an eos_id the model never emits).
    any_finished = (fin_scores[:, :1] > NEG_INF / 2)[:, :, None]  # [B, 1, 1]
    sequences = jnp.where(any_finished, fin_seqs, live_seqs)
    scores = jnp.where(any_finished[:, :, 0], fin_scores,
                       live_logp / penalty(max_lengths)[:, None])
    return sequences, scores
