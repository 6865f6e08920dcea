"""The model-option examples of docs/research_api.md run as written and say what they claim."""

import pathlib
import re

import jax

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "research_api.md"


def test_research_variant_examples_run_and_agree():
    text = DOC.read_text()
    section = text[text.index("### Research variants in the models"):text.index("## Notebooks")]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2
    ns: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), ns)  # noqa: S102 - the doc's own code
    mha, gqa, mqa = ns["mha"], ns["gqa"], ns["mqa"]
    assert abs(mha / gqa - 4) < 1e-3 and abs(mha / mqa - 8) < 1e-3  # N / K
    assert abs(ns["gqa_window"] / gqa - 256 / 2048) < 1e-3
    for name, value in (("MHA", mha), ("K = 2", gqa), ("MQA", mqa), ("window", ns["gqa_window"])):
        assert f"{value:.1f} MiB" in section, name  # the numbers in the text are these
    assert ns["t5"].encoder.relative_bias.table.shape == (32, 4)
    assert 0 < ns["share"] < 0.2
    assert ns["plain_config"].lora_rank == 0
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_leaves_with_path(ns["merged"])]
    assert paths and not any("_lora" in p for p in paths)  # plain params
