"""The pure-function examples of docs/research_api.md run as written, and say what they claim."""

import pathlib
import re

import jax.numpy as jnp
import numpy as np

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "research_api.md"


def _blocks() -> list[str]:
    text = DOC.read_text()
    section = text[text.index("## Research API: pure functions"):text.index("## Modules")]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_research_api_examples_run_and_agree():
    blocks = _blocks()
    assert len(blocks) >= 6
    ns: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), ns)  # noqa: S102 - the doc's own code
    b, t, n, h = ns["B"], ns["T"], ns["N"], ns["H"]
    assert ns["out"].shape == ns["flash"].shape == (b, t, n, h)
    np.testing.assert_allclose(ns["flash"], ns["out"], atol=1e-5)
    assert ns["weights"].shape == (b, n, t, ns["S"])
    # grouped-query == repeated heads; multi-query has the query's shape
    np.testing.assert_allclose(ns["gqa"], ns["same"], atol=1e-5)
    assert ns["mqa"].shape == (b, t, n, h)
    # the window keyword == the band as a dense mask
    np.testing.assert_allclose(ns["local"], ns["dense"], atol=1e-5)
    assert ns["by_position"].window == (8, 0)
    # packed rows: the second sentence never sees the first
    from transformer_jax import ops

    x, spec = ns["x"], ns["packed"]
    first_only = ops.dot_product_attention(x[:, :3], x[:, :3], x[:, :3], is_causal=True)
    np.testing.assert_allclose(ns["per_sentence"][:, :3], first_only, atol=1e-5)
    np.testing.assert_allclose(ns["per_sentence"],
                               ops.dot_product_attention(x, x, x, spec=spec), atol=1e-5)
    # T5
    assert ns["enc_bias"].shape == (1, n, ns["S"], ns["S"])
    assert ns["dec_bias"].shape == (1, n, t, t) and ns["step_bias"].shape == (1, n, 1, t)
    np.testing.assert_allclose(ns["step_bias"][0, :, 0], ns["dec_bias"][0, :, -1])
    np.testing.assert_array_equal(ns["buckets"], [3, 2, 1, 0, 17, 18, 19])
    # LoRA with b = 0: the frozen layer; the gradient reaches b only
    np.testing.assert_allclose(ns["y"], ns["h"] @ ns["w"], atol=1e-5)
    np.testing.assert_array_equal(ns["grad_a"], 0.0)
    assert float(jnp.abs(ns["grad_b"]).max()) > 0
    assert ns["w_merged"].shape == ns["w"].shape
