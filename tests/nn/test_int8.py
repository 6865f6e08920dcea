"""nn.int8 (int8 weights for decoding): against a reference model whose weights numpy rounds
to int8 and back, the Translator / CLI option, and the refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import synthetic_batch, tiny_config, tiny_model, trained_workdir

from transformer_jax import translate
from transformer_jax.inference import Translator
from transformer_jax.nn import build_model, quantize_int8, split_model

SENTENCES = ["twenty one", "seven", "nine thousand nine hundred and ninety nine",
             "one hundred and five", "", "eighty", "three thousand and twelve"]
ATTENTION = ("query", "key", "value", "out")


def np_round_trip(w: np.ndarray, axis: int) -> np.ndarray:
    """numpy: ``w`` quantised symmetrically (absmax / 127 along ``axis``) and dequantised."""
    absmax = np.max(np.abs(w), axis=axis, keepdims=True)
    scale = np.where(absmax > 0, absmax / np.float32(127), np.float32(1)).astype(np.float32)
    return (np.clip(np.round(w / scale), -127, 127) * scale).astype(w.dtype)


def np_reference(params, tied: bool) -> dict:
    """The float params with every projection weight rounded to int8 per output channel."""
    def visit(path, leaf):
        names = [str(getattr(k, "key", k)) for k in path]
        w = np.asarray(leaf)
        if names[-1] in ("query", "key", "value"):  # [D, N, H]: D in, N * H out
            return np_round_trip(w.reshape(w.shape[0], -1), 0).reshape(w.shape)
        if names[-1] == "out":  # [N, H, D]
            return np_round_trip(w.reshape(-1, w.shape[-1]), 0).reshape(w.shape)
        if names[-1] == "kernel" and names[-2] in ("wi", "wo", "dense"):
            return np_round_trip(w, 0)
        if names[-1] == "embedding" and tied:  # [V, D], one scale per output logit
            return np_round_trip(w, 1)
        return w
    return jax.tree_util.tree_map_with_path(visit, params)


def float_part(params) -> dict:
    """``params`` without the int8 modules (the layout of the float model)."""
    return {k: float_part(v) if isinstance(v, dict) else v for k, v in params.items()
            if not str(k).endswith("_int8")}


@pytest.mark.parametrize("tie", [True, False])
def test_quantized_model_is_the_numpy_rounded_model(tie):
    model_def, params = tiny_model(tie_output=tie, final_logits_bias=not tie)
    reference = np_reference(params, tie)
    batch = synthetic_batch(4, length=8, seed=1)
    forward = jax.jit(lambda graphdef, p: nnx.merge(graphdef, p)(batch), static_argnums=0)

    # below min_rows every projection multiplies by the dequantised weights: the reference
    q_def, q_params = split_model(quantize_int8(model_def.merge(params), min_rows=10**9))
    for got, want in zip(jax.tree_util.tree_leaves(float_part(q_params)),
                         jax.tree_util.tree_leaves(reference), strict=True):
        # equal up to the scales' last bit (XLA may divide by multiplying by the reciprocal)
        np.testing.assert_array_max_ulp(np.asarray(got), want, maxulp=2)
    assert q_params["decoder"]["layers"][0]["feed_forward"]["wi_int8"]["q"].dtype == jnp.int8
    want = forward(model_def.graphdef, reference)
    np.testing.assert_allclose(forward(q_def.graphdef, q_params), want, rtol=1e-5, atol=1e-5)

    # from 0 rows every projection also quantises its input: close, not equal
    model = quantize_int8(model_def.merge(params), min_rows=0)
    i_def, i_params = split_model(model)
    got = forward(i_def.graphdef, i_params)
    assert 0 < float(jnp.abs(got - want).max()) < 0.05 * float(jnp.std(want))
    with pytest.raises(ValueError, match="already quantised"):
        quantize_int8(model)


def test_quantize_refuses_adapters():
    config = tiny_config(lora_rank=2)  # refused before any weight is read: shapes suffice
    model = nnx.eval_shape(lambda: build_model("encoder_decoder", config, nnx.Rngs(0)))
    with pytest.raises(ValueError, match="merge_lora"):
        quantize_int8(model)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return trained_workdir(tmp_path_factory)


def test_translator_int8_decodes_as_the_numpy_rounded_model(workdir):
    fp32 = Translator.from_workdir(workdir)
    rounded = Translator(fp32.model, fp32.tokenizer, normalize=fp32.normalize,
                         params=np_reference(fp32.params, fp32.config.tie_output))
    # greedy, 7 sentences: the encoder's rows (7 x 16) take the int8 matmuls, the decoding
    # steps' 8 rows the rounded float weights
    int8 = Translator.from_workdir(workdir, quantize="int8")
    want = rounded.translate(SENTENCES, beam_size=1)
    assert int8.translate(SENTENCES, beam_size=1) == want and want[4] == ""
    assert fp32.quantize is None and int8.quantize == "int8"
    with pytest.raises(ValueError, match="quantize='int4' is not supported; use one of int8"):
        Translator.from_workdir(workdir, quantize="int4")


def test_cli_quantize(workdir, monkeypatch, capsys, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("\n".join(SENTENCES) + "\n")
    args = ["--workdir", workdir, "--input", str(source), "--compile_cache", "none",
            "--beam", "1"]
    assert translate.main(args + ["--quantize", "int8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == Translator.from_workdir(workdir, quantize="int8").translate(SENTENCES,
                                                                              beam_size=1)
    assert translate.main(args + ["--quantize", "fp16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --quantize=fp16 is not supported; use int8 or none."]
