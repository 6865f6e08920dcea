"""The demo model (``make demo``'s config, trained once per session by the ``demo_run``
fixture) through the translate command line: every number from 0 to 9,999 in one call, the
spellings people type, and the magnitude report of its summary.

CI trains 500 of ``make demo``'s 1,500 updates (``DEMO_TEST_STEPS`` in conftest.py sets
another count, 1500 for the whole demo); the full run is measured with beam search by
``bench/demo_numbers.py`` (docs/training.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import REPO, subprocess_env

from transformer_jax.data import numbers


def translate(workdir: str, lines: list[str], *args: str) -> list[str]:
    """One ``python -m transformer_jax.translate`` call with every line on stdin."""
    proc = subprocess.run(
        [sys.executable, "-m", "transformer_jax.translate", "--workdir", workdir, *args],
        input="".join(f"{line}\n" for line in lines), capture_output=True, text=True,
        cwd=REPO, env=subprocess_env(), timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.split("\n")
    assert out[-1] == "" and len(out) == len(lines) + 1
    return out[:-1]


def test_demo_config_run_gets_every_number_0_to_9999_right_greedy_in_one_cli_call(demo_run):
    small = range(10_000)
    outputs = translate(demo_run.workdir, [numbers.english_words(n) for n in small],
                        "--beam", "1")  # greedy: half the time of the default beam 4
    wrong = [(n, out) for n, out in zip(small, outputs, strict=True)
             if out != numbers.german_words(n)]
    assert wrong == [], f"{len(wrong)} wrong after {demo_run.steps} updates: {wrong[:20]}"


def test_cli_reads_what_people_type(demo_run):
    """Every spelling of a number reaches the model as the training spelling: the same output."""
    chosen = [2, 5, 22, 105, 305, 708, 1_000, 4_732, 9_999]
    texts = {name: [numbers.english_spellings(n)[name] for n in chosen]
             for name in ("plain", "num2words", "capitalised", "punctuated", "digits")}
    texts["a hundred"] = ["A hundred and five", "a thousand"]
    flat = [t for group in texts.values() for t in group]
    out = iter(translate(demo_run.workdir, flat))
    got = {name: [next(out) for _ in group] for name, group in texts.items()}
    plain = got.pop("plain")
    assert got.pop("a hundred") == [plain[chosen.index(105)], plain[chosen.index(1_000)]]
    for name, outputs in got.items():
        assert outputs == plain, name


def test_summary_and_last_line_report_exact_match_by_magnitude(demo_run):
    with open(os.path.join(demo_run.workdir, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    test = summary["test"]
    labels = ["0-9", "10-99", "100-999", "1000-9999", "10000-up"]
    assert [k for k in test if k.startswith("exact_match_")] == [
        f"exact_match_{label}" for label in labels]  # the test split holds every magnitude
    assert all(0.0 <= test[f"exact_match_{label}"] <= 100.0 for label in labels)
    last = demo_run.stdout.strip().splitlines()[-1]
    assert last.startswith(f"done: step {demo_run.steps};")
    by = ", ".join(f"{label} {test[f'exact_match_{label}']:.1f}" for label in labels)
    assert f"(exact_match by magnitude: {by});" in last
