"""optimizer.loss_chunk: the fused output projection + loss gives the training and evaluation
steps the numbers of the unfused loss, for tied and untied (biased) output layers."""

import functools

import jax
import numpy as np
import optax
import pytest
from helpers import init_state, synthetic_batch, tiny_model, tiny_train_config

from transformer_jax.errors import ConfigError
from transformer_jax.training import eval_step, train_step, validate_config


def test_fused_steps_equal_the_unfused_steps():
    dropout = 0.1  # dropout keys per row: the hidden states come from a vmap over rows
    model_def, params = tiny_model(dropout)
    batch = synthetic_batch(4, length=8, seed=5)
    tx = optax.sgd(1.0)  # new params = params - gradient

    def run(chunk):
        step = jax.jit(functools.partial(
            train_step, model_def=model_def, tx=tx, schedule=lambda c: 1.0,
            label_smoothing=0.1, dropout=dropout > 0, loss_chunk=chunk))
        state, metrics = step(init_state(params, tx), batch, jax.random.key(3))
        sums = jax.jit(functools.partial(eval_step, model_def=model_def, label_smoothing=0.1,
                                         loss_chunk=chunk))(params, batch)
        return state.params, metrics, sums

    want, got = run(0), run(5)  # 32 positions: six chunks of 5 and a padded one
    for key in ("loss", "nll", "accuracy", "tokens", "grad_norm"):
        np.testing.assert_allclose(got[1][key], want[1][key], rtol=1e-5, err_msg=key)
    for key, value in want[2].items():
        np.testing.assert_allclose(got[2][key], value, rtol=1e-5, err_msg=key)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got[0], want[0])


def test_a_negative_loss_chunk_is_a_config_error():
    config = tiny_train_config()
    config.optimizer.loss_chunk = -1
    with pytest.raises(ConfigError, match="optimizer.loss_chunk"):
        validate_config(config)


@pytest.mark.parametrize("kind, overrides", [
    ("encoder_decoder", {}),  # tied to the target embedding
    ("decoder_only", {"tie_output": False, "final_logits_bias": True}),
    ("decoder_only", {"tie_output": False, "use_bias": True}),  # the Dense layer's bias
])
def test_output_projection_is_what_logits_applies(kind, overrides):
    model_def, params = tiny_model(kind=kind, **overrides)
    model = model_def.merge(params)
    hidden = jax.random.normal(jax.random.key(0), (2, 3, model.config.d_model))
    kernel, bias = model.output_projection()
    assert kernel.shape == (model.config.d_model, model.config.vocab_size)
    assert (bias is None) == (kind == "encoder_decoder")  # tied, no final_logits_bias
    want = model.logits(hidden)
    got = jax.numpy.einsum("BTD,DV->BTV", hidden, kernel) + (0 if bias is None else bias)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
