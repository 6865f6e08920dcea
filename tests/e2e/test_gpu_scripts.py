"""bench/gpu_train.sh --smoke: the GPU path (train.py, synthetic step, translate, sacreBLEU)
end to end on this machine with a tiny model, writing one JSON."""

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO

MULTI30K = os.path.join(REPO, "..", "shared", "data", "multi30k")


@pytest.mark.skipif(not os.path.isdir(MULTI30K), reason="Multi30k is not in ../shared/data")
def test_gpu_train_smoke_writes_every_section(tmp_path):
    out = tmp_path / "gpu_train.json"
    env = dict(os.environ, PYTHON=sys.executable, GPU_TRAIN_OUT=str(out), JAX_PLATFORMS="cpu")
    proc = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_train.sh"), "--smoke",
                           "--data", MULTI30K], capture_output=True, text=True, env=env,
                          timeout=400, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] and result["env"]["python"]
    train = result["train"]
    assert train["returncode"] == 0 and train["tokens_per_s"] > 0
    assert [row["step"] for row in train["bleu_at_s"]] == [4]  # the one validation
    assert result["synthetic"]["updates_per_s"] > 0 and result["input_ratio"] > 0
    test = result["test"]
    assert test["sentences"] == 4
    assert 0 <= test["bleu_lowercased"] <= 100 and 0 <= test["bleu_cased"] <= 100
