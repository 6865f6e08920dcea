"""Decoder-only LM through the training machinery: packed LM loss, training, generation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import VOCAB, adam_step, init_state, packed_batch, tiny_config

from transformer_jax.errors import ConfigError
from transformer_jax.inference import make_generate_fn
from transformer_jax.nn import DecoderOnlyLM, split_model
from transformer_jax.training import default_config, validate_config
from transformer_jax.training.step import eval_step


@pytest.fixture(scope="module")
def lm():
    model = DecoderOnlyLM(tiny_config(), rngs=nnx.Rngs(0))
    return split_model(model)


def _causal_logits_fn(model_def, params, length):
    """``ids [n] -> logits [n, V]`` of one unpacked sequence fed to the decoder stack as it
    is (zero-padded to ``length``: with a causal mask, later padding cannot change earlier
    logits); one compilation. The stack, not the model call, so that the reference spells
    out the decoder input [BOS, tokens[:-1]] itself."""

    def run(p, ids):
        model = model_def.merge(p)
        return model.logits(model.decoder(ids)[0])

    fn = jax.jit(run)

    def logits(ids):
        padded = np.zeros((1, length), np.int32)
        padded[0, : len(ids)] = ids
        return np.asarray(fn(params, jnp.asarray(padded)))[0, : len(ids)]

    return logits


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_packed_lm_loss_equals_segments_run_alone(lm):
    """The loss of packed rows = mean NLL of each segment fed alone as [BOS, tokens[:-1]]."""
    model_def, params = lm
    batch = packed_batch(2, 24, seed=1, with_inputs=False)
    sums = jax.jit(lambda p, b: eval_step(p, b, model_def=model_def))(params, batch)
    full = _causal_logits_fn(model_def, params, 24)
    nll, count = 0.0, 0
    for r in range(2):
        seg_ids = batch["targets_segmentation"][r]
        for seg in (1, 2):
            tokens = batch["targets"][r][seg_ids == seg]
            ids = np.concatenate([[0], tokens[:-1]])  # [n]
            logp = _log_softmax(full(ids))  # [n, V]
            nll -= logp[np.arange(len(tokens)), tokens].sum()
            count += len(tokens)
    assert float(sums["weight_sum"]) == count
    np.testing.assert_allclose(float(sums["nll_sum"]) / count, nll / count, rtol=1e-5)
    assert float(sums["src_tokens"]) == 0.0  # the LM batch has no source side


def test_lm_training_steps_reduce_the_loss(lm):
    model_def, params = lm
    tx, per_device = adam_step(model_def, lr=1e-2)
    step = jax.jit(lambda s, b: per_device(s, b, jax.random.key(0)))
    batch = packed_batch(8, 24, seed=2, with_inputs=False)
    state = init_state(params, tx)
    losses = []
    for _ in range(15):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.6 * losses[0], losses  # memorising one batch
    assert losses[-1] < losses[5] < losses[0], losses


def _greedy_by_full_passes(full, prompt, steps):
    """Reference: rerun the whole sequence every step (no cache), take the argmax; the last
    step may only emit EOS (the decoders' length cap)."""
    seq = [0] + list(prompt)  # BOS + prompt; predicting the token after the last
    out = []
    for i in range(steps):
        logits = full(np.asarray(seq))[-1]  # [V]
        token = 1 if i == steps - 1 else int(np.argmax(logits))
        out.append(token)
        if token == 1:
            break
        seq.append(token)
    return out


@pytest.mark.parametrize("prompt_len", [0, 3])
def test_cached_generation_equals_full_forward_passes(lm, prompt_len):
    model_def, params = lm
    # larger weights than at init, so that greedy outputs vary from step to step
    params = jax.tree_util.tree_map(lambda x: x * 3.0 if x.ndim >= 2 else x, params)
    full = _causal_logits_fn(model_def, params, 16)
    prompts = np.random.default_rng(3).integers(3, VOCAB, size=(2, prompt_len))
    gen = make_generate_fn(model_def, max_new_tokens=8, temperature=0.0)
    out = np.asarray(gen(params, jnp.asarray(prompts, jnp.int32), jax.random.key(0)))
    for row, prompt in zip(out, prompts, strict=True):
        # the prompt's last token starts decoding; seq fed = [BOS, prompt]
        want = _greedy_by_full_passes(full, prompt.tolist(), 8)
        np.testing.assert_array_equal(row[: len(want)], want)
        assert (row[len(want):] == 0).all()


def test_sampling_returns_valid_ids(lm):
    model_def, params = lm
    gen = make_generate_fn(model_def, max_new_tokens=10, temperature=1.0, top_k=20)
    prompt = jnp.full((4, 2), 5, jnp.int32)
    out = np.asarray(gen(params, prompt, jax.random.key(1)))
    assert out.shape == (4, 10) and out.dtype == np.int32
    assert ((out >= 0) & (out < VOCAB)).all()
    for row in out:  # after the first EOS only padding
        eos = np.flatnonzero(row == 1)
        if eos.size:
            assert (row[eos[0] + 1:] == 0).all()
    other = np.asarray(gen(params, prompt, jax.random.key(2)))
    assert not np.array_equal(out, other)  # really sampled


def test_decoder_only_config_rejects_translation_metrics():
    c = default_config()
    c.model_kind = "decoder_only"
    with pytest.raises(ConfigError, match="eval_metrics"):
        validate_config(c)
    c.eval_metrics = ""
    assert validate_config(c).model_kind == "decoder_only"
    c.model_kind = "encoder_only"
    with pytest.raises(ConfigError, match="model_kind"):
        validate_config(c)
