"""``bench/translate_speed.py --smoke``: every installed engine decodes the same fixed-length
batches, and the fp32 engines agree on the greedy token ids."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("torch")
pytest.importorskip("sentencepiece")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "..", "shared", "data", "multi30k")


@pytest.mark.skipif(not os.path.isfile(os.path.join(DATA, "train.en")),
                    reason="needs the Multi30k text in ../shared/data/multi30k")
def test_smoke_run_compares_every_installed_engine(tmp_path):
    out = tmp_path / "result.json"
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "translate_speed.py"), "--smoke",
         "--root", str(tmp_path / "models"), "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    tokens = result["size"]["tokens"]
    assert {"jax", "hf"} <= set(result["results"])
    for engine, row in result["results"].items():
        assert set(row["modes"]) == {"greedy32", "beam32", "greedy1"}, engine
        for mode in row["modes"].values():  # every output is exactly `tokens` long
            assert mode["lengths"] == [tokens] and mode["tokens_per_s"] > 0, engine
    assert "| greedy32 |" in result["table"]
    for pair, share in result["agreement"].items():  # random fp32 weights: ties are rare
        assert "int8" in pair or share >= 0.9, (pair, share)  # int8 rounds: reported only
    assert "hf vs jax" in result["agreement"]
