"""bench/data_throughput.py --smoke runs end to end through the public API and writes its JSON."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_smoke_run_writes_every_number(tmp_path):
    out = tmp_path / "data_throughput.json"
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "data_throughput.py"), "--smoke",
         "--dataset", "numbers", "--batch-size", "32", "--json", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dataset"] == "numbers-small"
    train = result["train"]
    assert train["tokens_per_s"] > 0 and 0 < train["fill"] <= 1 and train["batches"] >= 2
    assert train["first_batch_s"] > 0 and "rss_delta_mib" in train
    assert set(result["one_off"]) == {"prepare_from_scratch_s", "token_cache_build_s",
                                      "prepare_cached_s"}
    assert [r["num_workers"] for r in result["subword_sampling"]] == [0, 1, 2]
    assert {a["gpus_per_host"] for a in result["accelerators"]} == {1, 4, 8}
