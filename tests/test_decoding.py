"""Decoding: searches against brute-force enumeration, numpy loops and full forward passes.

Two kinds of "model":

* a Markov chain over a 5-token vocabulary whose next-token log-probabilities depend on the
  last *two* tokens and on the example (the previous token and the example id live in the
  cache), so a beam search that mis-expands or mis-reorders the cache rows reads the wrong
  table row; the references enumerate every sequence in plain Python;
* a tiny random Transformer (untied output layer, seed picked so outputs vary) decoded through
  its KV cache and compared with argmax over repeated full (uncached) forward passes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer_jax import decoding
from transformer_jax.config import ModelConfig
from transformer_jax.inference import make_translate_fn
from transformer_jax.nn import Transformer, split_model

PAD, EOS = 0, 1


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _gnmt(n, alpha):
    return ((5.0 + n) / 6.0) ** alpha


# --------------------------------------------------------------------- Markov chain "model"


def _chain(seed, examples, vocab=5, scale=2.0):
    """Log-prob tables ``[E, V(prev), V(last), V(next)]``; PAD is never generated."""
    logits = np.random.RandomState(seed).randn(examples, vocab, vocab, vocab) * scale
    logits[..., PAD] = -np.inf
    return _log_softmax(logits).astype(np.float32)


def _chain_model(table):
    """``tokens_to_logits`` and the initial cache of ``table``; the cache holds the previous
    input token and the example id per row plus a scalar step index."""
    table_j = jnp.asarray(table)

    def tokens_to_logits(ids, cache):
        last = ids[:, 0]
        logits = table_j[cache["example"], cache["prev"], last]  # [B', V]
        return logits, {"prev": last, "example": cache["example"], "index": cache["index"] + 1}

    batch = table.shape[0]
    cache = {
        "prev": jnp.full((batch,), PAD, jnp.int32),
        "example": jnp.arange(batch, dtype=jnp.int32),
        "index": jnp.int32(0),
    }
    return tokens_to_logits, cache


def _enumerate(table, example, max_length, alpha):
    """Every EOS-terminated sequence of at most ``max_length`` tokens, best score first."""
    hyps = []

    def extend(prefix, prev, last, logp):
        for token in range(table.shape[-1]):
            step_logp = float(table[example, prev, last, token])
            if step_logp == -np.inf:
                continue
            seq = prefix + [token]
            if token == EOS:
                total = logp + step_logp
                hyps.append((total / _gnmt(len(seq), alpha), seq))
            elif len(seq) < max_length:
                extend(seq, last, token, logp + step_logp)

    extend([], PAD, PAD, 0.0)
    return sorted(hyps, key=lambda h: -h[0])


def _greedy_loop(table, example, max_length, buffer, min_len=0):
    out, prev, last = [], PAD, PAD
    for t in range(max_length):
        logp = table[example, prev, last].copy()
        if t < min_len - 1:
            logp[EOS] = -np.inf
        token = EOS if t == max_length - 1 else int(np.argmax(logp))
        out.append(token)
        if token == EOS:
            break
        prev, last = last, token
    return out + [PAD] * (buffer - len(out))


def _padded(seq, length):
    return seq + [PAD] * (length - len(seq))


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_wide_beam_returns_every_hypothesis_in_brute_force_order(alpha):
    # Beam 13 never prunes here (at most 12 live continuations per step), so the K best
    # finished hypotheses are exactly the brute-force ranking, with their penalised scores.
    table = _chain(seed=0, examples=2)
    fn, cache = _chain_model(table)
    max_lengths, buffer, beam = [3, 2], 4, 13
    seqs, scores = decoding.beam_search(
        cache, fn, batch_size=2, beam_size=beam, max_len=buffer, alpha=alpha,
        max_lengths=jnp.array(max_lengths))
    assert seqs.shape == (2, beam, buffer) and scores.shape == (2, beam)
    for b in range(2):
        expected = _enumerate(table, b, max_lengths[b], alpha)[:beam]
        n = len(expected)
        assert n == (13 if b == 0 else 4)
        np.testing.assert_array_equal(
            np.asarray(seqs[b, :n]), [_padded(s, buffer) for _, s in expected])
        np.testing.assert_allclose(np.asarray(scores[b, :n]), [s for s, _ in expected],
                                   rtol=1e-5)
        # slots no hypothesis could fill are marked impossible
        assert np.all(np.asarray(scores[b, n:]) <= decoding.NEG_INF / 2)


def _rows_table(rows):
    """First-order chain (the previous token is ignored) from next-token probability rows."""
    rows = np.asarray(rows, np.float64)
    with np.errstate(divide="ignore"):
        logp = np.log(rows / rows.sum(-1, keepdims=True))
    return np.broadcast_to(logp, (1, 5, 5, 5)).astype(np.float32)


def test_length_penalty_changes_the_winner():
    # First-order table: from BOS, EOS has 0.4 and token 2 has 0.55; after 2, EOS has 0.6.
    # alpha 0: "EOS" (log .4 = -0.92) beats "2 EOS" (log .33 = -1.11);
    # alpha 2: "2 EOS" scores -1.11 / (7/6)^2 = -0.81 and wins.
    rows = np.full((5, 5), 1e-3)
    rows[:, PAD] = 0.0
    rows[PAD] = [0.0, 0.4, 0.55, 0.025, 0.025]
    rows[2] = [0.0, 0.6, 0.2, 0.1, 0.1]
    rows[3] = rows[4] = [0.0, 0.1, 0.3, 0.3, 0.3]
    table = _rows_table(rows)
    fn, cache = _chain_model(table)
    winners = {}
    for alpha in (0.0, 2.0):
        expected = _enumerate(table, 0, 4, alpha)
        seqs, scores = decoding.beam_search(
            cache, fn, batch_size=1, beam_size=2, max_len=4, alpha=alpha)
        np.testing.assert_array_equal(np.asarray(seqs[0, 0]), _padded(expected[0][1], 4))
        np.testing.assert_allclose(float(scores[0, 0]), expected[0][0], rtol=1e-5)
        winners[alpha] = expected[0][1]
    assert winners == {0.0: [EOS], 2.0: [2, EOS]}


def test_beam_finds_what_greedy_misses():
    # Greedy takes the likelier first token 3, whose continuations are all poor; beam 2 keeps
    # token 2, whose EOS follows with probability 0.9.
    rows = np.full((5, 5), 0.25)
    rows[:, PAD] = 0.0
    rows[PAD] = [0.0, 0.0, 0.4, 0.6, 0.0]
    rows[2] = [0.0, 0.9, 0.05, 0.05, 0.0]
    table = _rows_table(rows)
    fn, cache = _chain_model(table)
    greedy = decoding.greedy_search(cache, fn, batch_size=1, max_len=3)
    seqs, scores = decoding.beam_search(cache, fn, batch_size=1, beam_size=2, max_len=3,
                                        alpha=0.0)
    best = _enumerate(table, 0, 3, 0.0)[0]
    assert best[1] == [2, EOS] and np.asarray(greedy)[0, 0] == 3
    np.testing.assert_array_equal(np.asarray(seqs[0, 0]), _padded(best[1], 3))
    np.testing.assert_allclose(float(scores[0, 0]), best[0], rtol=1e-6)


def test_negative_alpha_does_not_stop_early():
    # alpha < 0 favours short outputs, so the most a live beam can still score is bounded by
    # the penalty of the *shortest* length it can finish at. After step 2 the finished set is
    # {"EOS" -0.69, "3 EOS" -4.08}; the live "2 4" (log-prob -0.81) still finishes as
    # "2 4 EOS" with -0.82 / (8/6)^-2 = -1.46 and must replace "3 EOS". (Bounding with the
    # penalty at max length, -0.81 / (14/6)^-2 = -4.4 < -4.08, would stop one step short.)
    rows = np.zeros((5, 5))
    rows[PAD, [EOS, 2, 3]] = [0.5, 0.45, 0.05]
    rows[2, [EOS, 4]] = [0.01, 0.99]
    rows[3, [EOS, 4]] = [0.99, 0.01]
    rows[4, [EOS, 2]] = [0.99, 0.01]
    rows[EOS, EOS] = 1.0  # never used
    table = _rows_table(rows)
    fn, cache = _chain_model(table)
    seqs, scores = decoding.beam_search(cache, fn, batch_size=1, beam_size=2, max_len=9,
                                        alpha=-2.0)
    expected = _enumerate(table, 0, 9, -2.0)[:2]
    assert [s for _, s in expected] == [[EOS], [2, 4, EOS]]
    np.testing.assert_array_equal(np.asarray(seqs[0]), [_padded(s, 9) for _, s in expected])
    np.testing.assert_allclose(np.asarray(scores[0]), [s for s, _ in expected], rtol=1e-5)


def test_cache_reordering_matters_and_is_right(monkeypatch):
    # The second-order chain reads the previous token from the cache: following the wrong
    # parent rows changes the result, following the right ones matches brute force.
    table = _chain(seed=3, examples=2)
    fn, cache = _chain_model(table)

    def run():
        return decoding.beam_search(cache, fn, batch_size=2, beam_size=3, max_len=5,
                                    alpha=0.6)

    seqs, scores = run()
    for b in range(2):
        best = _enumerate(table, b, 5, 0.6)[0]
        np.testing.assert_array_equal(np.asarray(seqs[b, 0]), _padded(best[1], 5))
        np.testing.assert_allclose(float(scores[b, 0]), best[0], rtol=1e-5)
    monkeypatch.setattr(decoding, "gather_beams", lambda tree, *args: tree)
    wrong_seqs, wrong_scores = run()
    assert not np.allclose(np.asarray(wrong_scores), np.asarray(scores))


def test_only_changed_cache_leaves_are_reordered(monkeypatch):
    table = _chain(seed=3, examples=2)
    fn, cache = _chain_model(table)
    gathered = []
    original = decoding.gather_beams

    def recording(tree, *args):
        gathered.append(jnp.shape(tree))
        return original(tree, *args)

    monkeypatch.setattr(decoding, "gather_beams", recording)
    decoding.beam_search(cache, fn, batch_size=2, beam_size=3, max_len=4)
    # "prev" [B*K] changes every step; "example" is passed through and the scalar index is
    # shared by all rows.
    assert sorted(gathered) == [(6,)]


def test_beam_cache_keeps_per_example_leaves_and_reorders_per_beam_rows(monkeypatch):
    # beam_cache=True: the cache already has B*K rows ("prev") next to leaves of B rows, one
    # per example ("example"; "seen" changes every step). Only the per-beam rows follow the
    # beams, and the search equals the one over the expanded B-row cache.
    table, beams = _chain(seed=3, examples=2), 3
    fn, cache = _chain_model(table)

    def per_example(ids, cache):
        logits, new = fn(ids, dict(cache, example=jnp.repeat(cache["example"], beams)))
        return logits, dict(new, example=cache["example"], seen=cache["seen"] + 1)

    own = dict(cache, prev=jnp.repeat(cache["prev"], beams), seen=jnp.zeros(2, jnp.int32))
    gathered, original = [], decoding.gather_beams
    monkeypatch.setattr(decoding, "gather_beams",
                        lambda tree, *a: gathered.append(jnp.shape(tree)) or original(tree, *a))
    seqs, scores = decoding.beam_search(own, per_example, batch_size=2, beam_size=beams,
                                        max_len=4, beam_cache=True)
    assert gathered == [(6,)]
    ref_seqs, ref_scores = decoding.beam_search(cache, fn, batch_size=2, beam_size=beams,
                                                max_len=4)
    np.testing.assert_array_equal(seqs, ref_seqs)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-6)
    with pytest.raises(ValueError, match="batch size 2 or the beam rows 6"):
        decoding.beam_search(dict(own, bad=jnp.zeros(5)), per_example, batch_size=2,
                             beam_size=beams, max_len=4, beam_cache=True)


def test_greedy_respects_per_example_max_lengths_and_pads_after_eos():
    table = _chain(seed=1, examples=3)
    fn, cache = _chain_model(table)
    max_lengths, buffer = [6, 2, 1], 6
    out = np.asarray(decoding.greedy_search(cache, fn, batch_size=3, max_len=buffer,
                                            max_lengths=jnp.array(max_lengths)))
    for b in range(3):
        assert out[b].tolist() == _greedy_loop(table, b, max_lengths[b], buffer)
        eos_at = out[b].tolist().index(EOS)
        assert eos_at < max_lengths[b] and np.all(out[b, eos_at + 1:] == PAD)
    assert out[2].tolist() == [EOS] + [PAD] * 5  # max length 1: only the EOS


def test_min_len_masks_eos_before_it_unless_forced():
    table = _chain(seed=1, examples=3)
    fn, cache = _chain_model(table)
    max_lengths, buffer, min_len = [6, 2, 5], 6, 4
    out = np.asarray(decoding.greedy_search(cache, fn, batch_size=3, max_len=buffer,
                                            max_lengths=jnp.array(max_lengths), min_len=min_len))
    for b in range(3):
        assert out[b].tolist() == _greedy_loop(table, b, max_lengths[b], buffer, min_len)
    assert out[1].tolist()[:2] == out[1].tolist()[:1] + [EOS]  # the cap wins over min_len
    seqs, _ = decoding.beam_search(cache, fn, batch_size=3, beam_size=3, max_len=buffer,
                                   min_len=buffer)
    assert np.all(np.asarray(seqs)[:, :, buffer - 1] == EOS)  # exactly max_len tokens each
    assert np.all(np.asarray(seqs)[:, :, : buffer - 1] > EOS)


def test_beam_size_one_is_greedy():
    # Only an EOS ranked within the best K candidates finishes a hypothesis. Counting the
    # EOS ranked K..2K-1 too would finish "EOS" (log .4) here while greedy goes on to
    # "2 3 EOS" (log .6 * .55 = log .33).
    rows = np.full((5, 5), 0.01)
    rows[:, PAD] = 0.0
    rows[PAD, [EOS, 2]] = [0.4, 0.6]
    rows[2, [EOS, 3]] = [0.45, 0.55]
    rows[3, EOS] = 5.0
    trap = _rows_table(rows)[0]
    table = np.concatenate([_chain(seed=2, examples=3), trap[None]])
    fn, cache = _chain_model(table)
    max_lengths = jnp.array([7, 3, 5, 7])
    greedy = decoding.greedy_search(cache, fn, batch_size=4, max_len=7, max_lengths=max_lengths)
    seqs, scores = decoding.beam_search(cache, fn, batch_size=4, beam_size=1, max_len=7,
                                        alpha=0.0, max_lengths=max_lengths)
    np.testing.assert_array_equal(np.asarray(seqs[:, 0]), np.asarray(greedy))
    assert np.asarray(greedy)[3, :3].tolist() == [2, 3, EOS]
    for b in range(4):  # the score is the greedy path's log-probability
        tokens, prev, last, logp = np.asarray(greedy[b]), PAD, PAD, 0.0
        for token in tokens[: tokens.tolist().index(EOS) + 1]:
            logp += table[b, prev, last, token]
            prev, last = last, token
        np.testing.assert_allclose(float(scores[b, 0]), logp, rtol=1e-5)


# ------------------------------------------------------------------------------- sampling


def _first_order(seed, vocab=12):
    """Per-last-token logits ``[V, V]`` with well separated values; PAD never generated."""
    logits = np.random.RandomState(seed).permutation(vocab * vocab).reshape(vocab, vocab)
    logits = logits.astype(np.float32) * 0.05  # gaps >= 0.05
    logits[:, PAD] = -np.inf
    table = jnp.asarray(logits)

    def tokens_to_logits(ids, cache):
        return table[ids[:, 0]], {"index": cache["index"] + 1, "rows": cache["rows"]}

    return logits, tokens_to_logits


def _allowed(logits, temperature, top_k, top_p):
    """numpy: bool ``[V]`` of the tokens temperature/top-k/top-p sampling may emit."""
    order = np.argsort(-logits)
    allowed = np.zeros(logits.shape, bool)
    kept = order[:top_k] if top_k else order[np.isfinite(logits[order])]
    probs = np.exp((logits[kept] - logits[kept].max()) / temperature)
    probs /= probs.sum()
    mass_before = 0.0
    for token, p in zip(kept, probs, strict=True):
        if mass_before >= top_p:
            break
        allowed[token] = True
        mass_before += p
    return allowed, dict(zip(kept.tolist(), probs.tolist(), strict=True))


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(0.7, 3, 1.0), (1.0, 0, 0.6), (1.5, 5, 0.8)])
def test_sampling_stays_in_the_filtered_set(temperature, top_k, top_p):
    logits, fn = _first_order(seed=4)
    batch, length = 512, 5
    cache = {"index": jnp.int32(0), "rows": jnp.zeros((batch,))}
    run = jax.jit(functools.partial(
        decoding.sample, tokens_to_logits=fn, batch_size=batch, max_len=length,
        temperature=temperature, top_k=top_k, top_p=top_p))
    allowed = {last: _allowed(logits[last], temperature, top_k, top_p)[0]
               for last in range(logits.shape[0])}
    assert all(1 <= a.sum() < a.size - 1 for a in allowed.values())  # the filters do filter
    firsts = []
    for seed in range(4):
        out = np.asarray(run(cache, rng=jax.random.key(seed)))
        for tokens in out.tolist():
            eos_at = tokens.index(EOS)  # always there: forced at the last position
            assert tokens[eos_at + 1:] == [PAD] * (length - eos_at - 1)
            last = PAD
            for t, token in enumerate(tokens[: eos_at + 1]):
                assert token == EOS if t == length - 1 else allowed[last][token], (t, last)
                last = token
        firsts.append(out[:, 0])
    # The first token (after BOS) follows the renormalised distribution.
    firsts = np.concatenate(firsts)
    _, probs = _allowed(logits[PAD], temperature, top_k, top_p)
    mask = allowed[PAD]
    expected = np.array([probs.get(v, 0.0) if mask[v] else 0.0 for v in range(mask.size)])
    expected /= expected.sum()
    observed = np.bincount(firsts, minlength=mask.size) / firsts.size
    assert set(np.flatnonzero(observed)) == set(np.flatnonzero(mask))
    np.testing.assert_allclose(observed, expected, atol=0.04)


def test_zero_temperature_and_top_k_one_are_greedy():
    table = _chain(seed=5, examples=3)
    fn, cache = _chain_model(table)
    greedy = np.asarray(decoding.greedy_search(cache, fn, batch_size=3, max_len=6))
    for kwargs in ({"temperature": 0.0}, {"top_k": 1}, {"temperature": 1e-4}):
        out = decoding.sample(cache, fn, jax.random.key(7), batch_size=3, max_len=6, **kwargs)
        np.testing.assert_array_equal(np.asarray(out), greedy, err_msg=str(kwargs))
    # a tiny temperature is greedy because the chosen rows' logit gaps are large
    gaps = np.sort(table, -1)
    assert np.all(gaps[..., -1] - gaps[..., -2] > 1e-3)


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (3, 1.0), (0, 0.9)])
def test_sampling_at_a_vanishing_temperature_is_greedy(top_k, top_p):
    """Dividing before shifting overflowed every allowed logit to inf (all-PAD output)."""
    fn, cache = _constant_model([9.0, 0.0, 1.0, 2.0], batch=8)
    out = decoding.sample(cache, fn, jax.random.key(0), batch_size=8, max_len=3,
                          temperature=1e-38, top_k=top_k, top_p=top_p)
    np.testing.assert_array_equal(np.asarray(out), [[3, 3, EOS]] * 8)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf")])
def test_beam_search_refuses_a_non_finite_length_penalty(alpha):
    fn, cache = _constant_model([9.0, 0.0, 1.0, 2.0], batch=2)
    with pytest.raises(ValueError, match="is not a finite number"):
        decoding.beam_search(cache, fn, batch_size=2, beam_size=2, max_len=3, alpha=alpha)


def test_temperature_keeps_forced_eos():
    logits, fn = _first_order(seed=6)
    cache = {"index": jnp.int32(0), "rows": jnp.zeros((64,))}
    out = np.asarray(decoding.sample(cache, fn, jax.random.key(0), batch_size=64, max_len=2,
                                     temperature=1e9))
    assert np.all((out[:, 1] == EOS) | (out[:, 0] == EOS))


# ---------------------------------------------------------------------------------- errors


def test_bad_shapes_raise_clear_errors():
    table = _chain(seed=0, examples=2)
    fn, cache = _chain_model(table)

    def three_d(ids, cache):
        logits, cache = fn(ids, cache)
        return logits[:, None, :], cache  # [B, 1, V]

    with pytest.raises(ValueError, match=r"must return logits \[2, V\].*Squeeze"):
        decoding.greedy_search(cache, three_d, batch_size=2, max_len=3)
    with pytest.raises(ValueError, match=r"must return logits \[6, V\]"):
        decoding.beam_search(cache, three_d, batch_size=2, beam_size=3, max_len=3)
    with pytest.raises(ValueError, match=r"max_lengths must have shape \(2,\)"):
        decoding.greedy_search(cache, fn, batch_size=2, max_len=3, max_lengths=jnp.array([3]))
    with pytest.raises(ValueError, match=r"max_lengths must have shape \(2,\)"):
        decoding.beam_search(cache, fn, batch_size=2, beam_size=2, max_len=3,
                             max_lengths=jnp.ones((2, 1), jnp.int32))
    with pytest.raises(ValueError, match=r"cache leaf .*lead with the batch size 3"):
        decoding.beam_search(cache, fn, batch_size=3, beam_size=2, max_len=3)
    with pytest.raises(ValueError, match="start_ids must have shape"):
        decoding.greedy_search(cache, fn, batch_size=2, max_len=3, start_ids=[0, 0, 0])
    with pytest.raises(ValueError, match="beam_size must be >= 1"):
        decoding.beam_search(cache, fn, batch_size=2, beam_size=0, max_len=3)
    for kwargs, message in [({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
                            ({"top_k": -2}, "top_k")]:
        with pytest.raises(ValueError, match=message):
            decoding.sample(cache, fn, jax.random.key(0), batch_size=2, max_len=3, **kwargs)


def test_expand_and_gather_beams():
    tree = {"x": jnp.arange(6).reshape(2, 3), "index": jnp.int32(4)}
    expanded = decoding.expand_for_beam(tree, 2)
    np.testing.assert_array_equal(expanded["x"], [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]])
    assert int(expanded["index"]) == 4
    flat = {"x": jnp.arange(4)[:, None] * 10, "index": jnp.int32(4)}  # rows b*K + k
    gathered = decoding.gather_beams(flat, jnp.array([[1, 1], [1, 0]]), 2, 2)
    np.testing.assert_array_equal(gathered["x"][:, 0], [10, 10, 30, 20])
    np.testing.assert_allclose(decoding.length_penalty(7, 0.6), (12 / 6) ** 0.6, rtol=1e-6)


# ------------------------------------------------------------------------ real Transformer

MAX_LEN = 10
SRC_LENGTHS = (7, 4, 2)


@pytest.fixture(scope="module")
def transformer():
    config = ModelConfig.tiny(vocab_size=32, d_model=32, num_heads=2, num_layers=1, d_ff=64,
                              dropout_rate=0.0, max_len=32, share_embeddings=False,
                              tie_output=False)
    model_def, params = split_model(Transformer(config, rngs=nnx.Rngs(1)))
    rng = np.random.RandomState(0)
    src = np.zeros((len(SRC_LENGTHS), max(SRC_LENGTHS)), np.int32)
    for i, n in enumerate(SRC_LENGTHS):
        src[i, :n] = rng.randint(3, config.vocab_size, n)

    @jax.jit
    def full_logits(params, src, tgt_in):  # no cache: the whole prefix every call
        model = model_def.merge(params)
        return model.decode(tgt_in, encoded=model.encode(src), src_ids=src)[0]  # [B, T, V]

    @functools.partial(jax.jit, static_argnames=("beam_size", "alpha"))
    def beam(params, src, beam_size, alpha):
        model = model_def.merge(params)
        cache = model.init_cache(src.shape[0], MAX_LEN, encoded=model.encode(src), src_ids=src)

        def tokens_to_logits(ids, cache):
            logits, cache = model.decode(ids, cache=cache)
            return logits[:, 0], cache

        return decoding.beam_search(cache, tokens_to_logits, batch_size=src.shape[0],
                                    beam_size=beam_size, max_len=MAX_LEN, alpha=alpha)

    greedy = make_translate_fn(model_def, max_length=MAX_LEN, beam_size=1)
    best_beam = make_translate_fn(model_def, max_length=MAX_LEN, beam_size=3,
                                  length_penalty=0.6)
    return dict(params=params, src=jnp.asarray(src), full_logits=full_logits, beam=beam,
                greedy=greedy, best_beam=best_beam)


def test_cached_greedy_equals_argmax_of_full_forward_passes(transformer):
    t = transformer
    cached = np.asarray(t["greedy"](t["params"], t["src"]))
    batch = cached.shape[0]
    # Reference: re-run the full model on the growing prefix (buffer beyond it is ignored by
    # the causal mask), take the argmax at the newest position; EOS forced at the end.
    tgt_in = np.zeros((batch, MAX_LEN), np.int32)
    out = np.zeros((batch, MAX_LEN), np.int32)
    finished = np.zeros(batch, bool)
    min_gap = np.inf
    for t_ in range(MAX_LEN):
        logits = np.asarray(t["full_logits"](t["params"], t["src"], jnp.asarray(tgt_in)))[:, t_]
        top2 = np.sort(logits, -1)[:, -2:]
        min_gap = min(min_gap, float((top2[:, 1] - top2[:, 0])[~finished].min()))
        token = np.where(t_ == MAX_LEN - 1, EOS, logits.argmax(-1))
        token = np.where(finished, PAD, token)
        out[:, t_] = token
        finished |= token == EOS
        if t_ + 1 < MAX_LEN:
            tgt_in[:, t_ + 1] = token
        if finished.all():
            break
    assert min_gap > 1e-3  # argmax is not decided by float noise
    np.testing.assert_array_equal(cached, out)
    assert len({tuple(r) for r in cached.tolist()}) == batch  # rows differ
    assert len(set(cached.ravel().tolist())) > 4  # and are not one repeated token


def test_transformer_beam_scores_are_rescored_log_probabilities(transformer):
    # Every beam hypothesis's score equals its teacher-forced log-probability under the full
    # (uncached) model divided by the GNMT penalty: following the wrong cache rows, or
    # expanding the encoder keys/values wrongly, would break this.
    t = transformer
    seqs, scores = t["beam"](t["params"], t["src"], beam_size=3, alpha=0.6)
    seqs, scores = np.asarray(seqs), np.asarray(scores)
    for k in range(seqs.shape[1]):
        tgt_in = np.concatenate([np.zeros_like(seqs[:, k, :1]), seqs[:, k, :-1]], axis=1)
        logp = np.asarray(jax.nn.log_softmax(
            t["full_logits"](t["params"], t["src"], jnp.asarray(tgt_in)), -1))  # [B, T, V]
        for b, seq in enumerate(seqs[:, k].tolist()):
            n = seq.index(EOS) + 1
            total = sum(logp[b, i, seq[i]] for i in range(n))
            np.testing.assert_allclose(scores[b, k], total / _gnmt(n, 0.6), rtol=1e-4)
    assert all(len({tuple(s) for s in beams.tolist()}) == 3 for beams in seqs)  # distinct
    assert np.all(np.diff(scores, axis=1) <= 0)  # best first


def test_mixed_length_batch_equals_sentence_by_sentence(transformer):
    t = transformer
    batch_greedy = np.asarray(t["greedy"](t["params"], t["src"]))
    batch_beam, _ = t["beam"](t["params"], t["src"], beam_size=3, alpha=0.6)
    for i, n in enumerate(SRC_LENGTHS[1:], start=1):
        alone = t["src"][i : i + 1, :n]  # unpadded
        np.testing.assert_array_equal(np.asarray(t["greedy"](t["params"], alone))[0],
                                      batch_greedy[i])
        # make_translate_fn's beam path returns the best of the same search
        np.testing.assert_array_equal(np.asarray(t["best_beam"](t["params"], alone))[0],
                                      np.asarray(batch_beam)[i, 0])


# ------------------------------------------------------------------ masked tokens: EOS, PAD


def _constant_model(logits, batch):
    """``tokens_to_logits`` that returns the same ``logits [V]`` for every row and step."""
    row = jnp.asarray(logits, jnp.float32)

    def tokens_to_logits(ids, cache):
        return jnp.broadcast_to(row, (ids.shape[0], row.shape[0])), {"index": cache["index"] + 1}

    return tokens_to_logits, {"index": jnp.int32(0)}


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (3, 1.0), (0, 0.9)])
def test_sampling_at_tiny_temperature_keeps_the_forced_eos(top_k, top_p):
    # max_len=1 forces EOS (id 1, logit -15). Divided by 1e-6 it is -1.5e7: below a finite
    # mask value of -1e7, so a finite mask would let PAD/2/3 win; -inf masks cannot.
    fn, cache = _constant_model([-30.0, -15.0, 2.0, 1.0], batch=4)
    out = decoding.sample(cache, fn, jax.random.key(0), batch_size=4, max_len=1,
                          temperature=1e-6, top_k=top_k, top_p=top_p)
    np.testing.assert_array_equal(np.asarray(out), [[EOS]] * 4)


def test_no_search_generates_pad_even_when_it_is_the_best_token():
    # PAD (id 0) has by far the highest logit; EOS is forced at the third position.
    fn, cache = _constant_model([9.0, 0.0, 1.0, 2.0], batch=64)
    expected = [3, 3, EOS]
    greedy = decoding.greedy_search(cache, fn, batch_size=64, max_len=3)
    np.testing.assert_array_equal(np.asarray(greedy), [expected] * 64)
    sampled = np.asarray(decoding.sample(cache, fn, jax.random.key(1), batch_size=64,
                                         max_len=3, temperature=2.0))
    for row in sampled.tolist():
        assert EOS in row and PAD not in row[: row.index(EOS)], row
    assert np.any(sampled == 2) and np.any(sampled == 3)  # it did sample
    seqs, scores = decoding.beam_search(cache, fn, batch_size=64, beam_size=3, max_len=3)
    seqs = np.asarray(seqs)
    live = np.asarray(scores) > decoding.NEG_INF / 2  # real hypotheses
    assert live[:, 0].all()
    for b, k in zip(*np.nonzero(live), strict=True):
        row = seqs[b, k].tolist()
        assert PAD not in row[: row.index(EOS)], row
