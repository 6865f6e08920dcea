"""ModelConfig: validation messages, (de)serialisation, presets and the parameter formula."""

import dataclasses
import json

import pytest

from transformer_jax.config import ModelConfig
from transformer_jax.param_count import count_params


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(d_model=500, num_heads=8),
            r"d_model=500 is not divisible by num_heads=8; choose num_heads that divides d_model",
        ),
        (dict(d_model=0), r"d_model=0 must be a positive integer"),
        (dict(vocab_size=-3), r"vocab_size=-3 must be a positive integer"),
        (dict(num_heads=0), r"num_heads=0 must be a positive integer"),
        (dict(d_ff=2.5), r"d_ff=2.5 must be a positive integer"),
        (dict(num_encoder_layers=-1), r"num_encoder_layers=-1 must be a non-negative"),
        (dict(num_layers=1, num_decoder_layers=0), r"decoder needs at least one layer"),
        (dict(dropout_rate=1.0), r"dropout_rate=1.0 must be in \[0, 1\)"),
        (dict(attention_dropout_rate=-0.1), r"attention_dropout_rate=-0.1 must be in \[0, 1\)"),
        (dict(positional="relative"), r"positional='relative' is not supported"),
        (dict(dtype="float64"), r"dtype='float64' is not a valid dtype name"),
        (dict(param_dtype="fp32"), r"param_dtype='fp32' is not a valid dtype name"),
        (dict(attention_impl="flash"), r"attention_impl='flash' is unknown"),
        (
            dict(attention_impl="jax", attention_dropout_rate=0.1),
            r"attention_impl='jax' does not support attention dropout",
        ),
        (
            dict(positional="rope", d_model=60, num_heads=4),
            r"positional='rope' needs an even head dim.*= 15",
        ),
        (
            dict(positional="sinusoidal", d_model=63, num_heads=3),
            r"positional='sinusoidal' needs an even d_model; got d_model=63",
        ),
        (dict(layer_norm_epsilon=0.0), r"layer_norm_epsilon=0.0 must be a positive number"),
        (dict(pad_id=64, vocab_size=64), r"pad_id=64 must be a token id in \[0, vocab_size=64\)"),
    ],
)
def test_validation_messages(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_valid_odd_combinations_are_accepted():
    # Odd head dim is fine without RoPE; odd d_model is fine with learned positions.
    assert ModelConfig(d_model=60, num_heads=4, positional="alibi").head_dim == 15
    assert ModelConfig(d_model=63, num_heads=3, positional="learned").head_dim == 21
    # jax attention without dropout is fine.
    ModelConfig(attention_impl="jax", attention_dropout_rate=0.0)


def test_replace_revalidates():
    with pytest.raises(ValueError, match="not divisible"):
        dataclasses.replace(ModelConfig(), num_heads=7)
    with pytest.raises(ValueError, match="not divisible"):
        ModelConfig().replace(num_heads=7)


def test_properties_resolve_layer_counts():
    c = ModelConfig(num_layers=3)
    assert (c.encoder_layers, c.decoder_layers, c.head_dim) == (3, 3, 64)
    c = ModelConfig(num_layers=3, num_encoder_layers=5, num_decoder_layers=1)
    assert (c.encoder_layers, c.decoder_layers) == (5, 1)
    assert str(ModelConfig(dtype="bfloat16").compute_dtype) == "bfloat16"


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelConfig().d_model = 3


def test_dict_round_trip_through_json():
    c = ModelConfig.tiny(positional="rope", pre_norm=True, num_decoder_layers=1)
    d = json.loads(json.dumps(c.to_dict()))
    assert ModelConfig.from_dict(d) == c
    assert set(d) == {f.name for f in dataclasses.fields(ModelConfig)}


def test_from_dict_unknown_key_names_it_and_lists_valid_keys():
    with pytest.raises(ValueError, match=r"Unknown ModelConfig key\(s\) \['d_modle'\]") as info:
        ModelConfig.from_dict({"d_modle": 256, "num_heads": 4})
    assert "d_model" in str(info.value) and "vocab_size" in str(info.value)
    with pytest.raises(ValueError, match=r"\['a', 'b'\]"):
        ModelConfig.from_dict({"b": 1, "a": 2})


def test_presets_match_the_paper_table():
    base, big, tiny = ModelConfig.base(), ModelConfig.big(), ModelConfig.tiny()
    assert (base.d_model, base.num_heads, base.d_ff, base.num_layers) == (512, 8, 2048, 6)
    assert base.dropout_rate == 0.1 and base.vocab_size == 37000
    assert (big.d_model, big.num_heads, big.d_ff, big.dropout_rate) == (1024, 16, 4096, 0.3)
    assert (tiny.d_model, tiny.num_heads, tiny.d_ff, tiny.num_layers) == (64, 4, 128, 2)
    assert ModelConfig.base(vocab_size=1000, pre_norm=True).vocab_size == 1000


def _hand_count_base() -> int:
    """Paper base model, written out term by term (independent of the formula's structure)."""
    d, f, v, n_layers = 512, 2048, 37000, 6
    mha = 4 * (d * d + d)  # q, k, v, o weights + biases
    ffn = d * f + f + f * d + d
    ln = 2 * d
    enc = n_layers * (mha + ffn + 2 * ln)
    dec = n_layers * (2 * mha + ffn + 3 * ln)
    return v * d + enc + dec


def test_count_params_base_is_about_63m():
    n = count_params(ModelConfig.base(vocab_size=37000))
    print(f"base (vocab 37000, shared + tied) parameters: {n:,}")
    assert n == _hand_count_base() == 63_082_496
    # Paper table 3 reports 65M (its exact vocabulary and bookkeeping differ slightly).
    assert 62e6 < n < 66e6


def test_count_params_options_change_the_count_by_the_expected_terms():
    base = ModelConfig.base(vocab_size=1000)
    n = count_params(base)
    d, v = 512, 1000
    assert count_params(base.replace(share_embeddings=False)) == n + v * d
    assert count_params(base.replace(tie_output=False)) == n + d * v + v
    assert count_params(base.replace(positional="learned")) == n + 2 * 512 * d
    assert count_params(base.replace(pre_norm=True)) == n + 2 * 2 * d
    no_bias = count_params(base.replace(use_bias=False))
    assert n - no_bias == 6 * (4 * d + 2048 + d) + 6 * (8 * d + 2048 + d)
