"""``bench/startup.py --smoke``: a cold and a warm run of the translate command on one
sentence give the same output, and the JSON holds both timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO, trained_workdir


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return trained_workdir(tmp_path_factory)


def test_smoke_run_times_a_cold_and_a_warm_start(workdir, tmp_path):
    out = tmp_path / "startup.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "startup.py"), "--smoke", "--workdir",
         workdir, "--sentence", "twenty one", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"after cold", "after warm"}
    for row in result["results"].values():
        assert len(row["wall"]["runs"]) == 1 and row["wall"]["median"] > 0
    assert result["identical_outputs"] and result["output"][0].count("\n") == 1
