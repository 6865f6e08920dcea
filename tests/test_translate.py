"""python -m transformer_jax.translate: line order/count, empty lines, UTF-8 errors, scores,
exit codes."""

import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys

import pytest
import sacrebleu
from helpers import TRAINED_CHECKPOINT_EVERY, trained_workdir

from transformer_jax import translate as cli
from transformer_jax.inference import Translator

LINES = ["twenty one", "", "seven", "nine thousand nine hundred and ninety nine", "",
         "one hundred and five", "eighty"]
REFS = ["einundzwanzig", "", "sieben", "neuntausendneunhundertneunundneunzig", "",
        "einhundertfünf", "achtzig"]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return trained_workdir(tmp_path_factory)


def run_main(monkeypatch, capsys, argv, stdin: bytes):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    capsys.readouterr()
    code = cli.main([*argv, "--compile_cache", "none"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_keeps_lines_and_reports_sacrebleu_scores(workdir, tmp_path):
    ref = tmp_path / "ref.txt"
    ref.write_text("\n".join(REFS) + "\n", encoding="utf-8")
    cache = tmp_path / "jax_cache"
    proc = subprocess.run(
        [sys.executable, "-m", "transformer_jax.translate", "--workdir", workdir, "--beam", "1",
         "--batch_size", "2", "--reference", str(ref), "--compile_cache", str(cache)],
        input=("\n".join(LINES) + "\n").encode("utf-8"), capture_output=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode("utf-8").split("\n")
    assert out[-1] == "" and len(out) == len(LINES) + 1
    out = out[:-1]
    translator = Translator.from_workdir(workdir)
    for line, got in zip(LINES, out, strict=True):  # each line on its own through the API
        assert got == (translator.translate([line], beam_size=1)[0] if line else "")
    err = proc.stderr.decode().strip().splitlines()
    scores = dict(re.findall(r"(bleu|chrf|exact_match) ([0-9.]+)", err[-1]))
    assert float(scores["bleu"]) == pytest.approx(
        sacrebleu.corpus_bleu(out, [REFS]).score, abs=1e-4)
    assert float(scores["chrf"]) == pytest.approx(
        sacrebleu.corpus_chrf(out, [REFS]).score, abs=1e-4)
    same = sum(h == r for h, r in zip(out, REFS, strict=True))
    assert float(scores["exact_match"]) == pytest.approx(100 * same / len(REFS), abs=1e-4)
    assert f"({len(LINES)} lines" in err[-1]
    assert any(cache.iterdir())  # the compiled programs, for the next run
    if importlib.util.find_spec("flatbuffers") is not None:  # and the exported ones
        assert any((cache / cli.PROGRAMS_DIR).iterdir())


def test_cli_streams_chunks_in_input_order(workdir, monkeypatch, capsys):
    words = ["seven", "twenty one", "nine thousand nine hundred and ninety nine", "", "eighty",
             "one hundred and five", "three", "four hundred and forty four"]
    lines = [words[(7 * i) % len(words)] for i in range(37)]  # mixed lengths, some blank
    code, out, err = run_main(monkeypatch, capsys,
                              ["--workdir", workdir, "--beam", "1", "--batch_size", "4",
                               "--chunk_size", "5"], ("\n".join(lines) + "\n").encode())
    assert code == 0, err
    want = Translator.from_workdir(workdir).translate(lines, beam_size=1)
    assert out.split("\n") == [*want, ""]
    assert "37 lines" in err  # progress on stderr: the input is not a terminal


def test_cli_bad_line_in_a_later_chunk_stops_after_the_earlier_chunks(workdir, monkeypatch,
                                                                      capsys):
    code, out, err = run_main(monkeypatch, capsys,
                              ["--workdir", workdir, "--beam", "1", "--chunk_size", "2"],
                              b"seven\neighty\nthree\n\xff\n")
    assert code == 1 and len(out.split("\n")) == 3  # the first chunk, written
    assert "error: line 4 of the input is not valid UTF-8" in err


def test_iter_chunks_splits_like_read_lines():
    data = b"a\r\nb\n\nc\nd"
    chunks = list(cli.iter_chunks(io.BytesIO(data), 2))
    assert chunks == [["a", "b"], ["", "c"], ["d"]]
    assert sum(chunks, []) == cli.read_lines(data)
    assert list(cli.iter_chunks(io.BytesIO(b""), 3)) == []


def test_cli_averaged_and_step_match_the_api(workdir, monkeypatch, capsys):
    lines = ["seven", "", "twenty one"]
    every = TRAINED_CHECKPOINT_EVERY
    for flags, kwargs in ((["--averaged"], {"averaged": True}),
                          (["--step", str(every)], {"step": every})):
        code, out, err = run_main(monkeypatch, capsys,
                                  ["--workdir", workdir, "--beam", "1", "--batch_size", "2",
                                   *flags], "\n".join(lines).encode())
        assert code == 0, err
        want = Translator.from_workdir(workdir, **kwargs).translate(lines, beam_size=1,
                                                                    batch_size=2)
        assert out.split("\n") == [*want, ""]


def test_cli_length_penalty_defaults_to_the_runs_evaluation(workdir, monkeypatch, capsys):
    seen = []
    real = Translator.translate

    def spy(self, lines, **kwargs):
        seen.append(kwargs["alpha"])
        return real(self, lines, **kwargs)

    monkeypatch.setattr(Translator, "translate", spy)
    for flags in ([], ["--alpha", "1.3"]):
        code, _, err = run_main(monkeypatch, capsys, ["--workdir", workdir, "--beam", "2", *flags],
                                b"seven\n")
        assert code == 0, err
    assert seen == [0.8, 1.3]  # the run's eval_length_penalty (tests/helpers.py), then --alpha
    assert Translator.from_workdir(workdir).length_penalty == 0.8


def test_cli_invalid_utf8_names_the_line(workdir, monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, ["--workdir", workdir],
                              b"one\n\ntwo \xc3\x28 three\nfour\n")
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: line 3 of the input is not valid UTF-8")


def test_cli_reference_problems(workdir, monkeypatch, capsys, tmp_path):
    ref = tmp_path / "ref.txt"
    ref.write_bytes(b"eins\n\xff\n")
    code, _, err = run_main(monkeypatch, capsys, ["--workdir", workdir, "--reference", str(ref)],
                            b"one\ntwo\n")
    assert code == 1 and "line 2 of --reference is not valid UTF-8" in err
    ref.write_text("eins\n", encoding="utf-8")
    code, _, err = run_main(monkeypatch, capsys, ["--workdir", workdir, "--reference", str(ref)],
                            b"one\ntwo\n")
    assert code == 1 and "has 1 lines but the input has 2" in err


def test_cli_missing_workdir_or_step_exit_2(workdir, monkeypatch, capsys, tmp_path):
    code, out, err = run_main(monkeypatch, capsys, ["--workdir", str(tmp_path / "none")],
                              b"one\n")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "no work directory" in err
    code, _, err = run_main(monkeypatch, capsys, ["--workdir", str(tmp_path)], b"one\n")
    assert code == 2 and "no checkpoint" in err
    code, _, err = run_main(monkeypatch, capsys, ["--workdir", workdir, "--step", "3"], b"one\n")
    assert code == 2 and "step 3" in err and "steps present" in err


@pytest.mark.parametrize("alpha", ["nan", "inf", "-inf"])
def test_cli_non_finite_alpha_exit_2(workdir, monkeypatch, capsys, alpha):
    code, out, err = run_main(monkeypatch, capsys, ["--workdir", workdir, f"--alpha={alpha}"],
                              b"one\n")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        f"error: --alpha={float(alpha)} is not a finite number; give a finite length penalty "
        "such as 0.6."]


@pytest.mark.parametrize("beam", [1, 2])
def test_api_non_finite_alpha_is_refused(workdir, beam):
    translator = Translator.from_workdir(workdir)
    with pytest.raises(ValueError, match="alpha=nan is not a finite number"):
        translator.translate(["one"], beam_size=beam, alpha=float("nan"))
    with pytest.raises(ValueError, match="alpha=inf is not a finite number"):
        translator.translate_ids([[5, 1]], beam_size=beam, alpha=float("inf"))


def test_read_lines_splits_like_text_files():
    assert cli.read_lines(b"a\r\nb\n\nc") == ["a", "b", "", "c"]
    assert cli.read_lines(b"a\n") == ["a"]
    assert cli.read_lines(b"") == []
    assert cli.read_lines(b"\n\n") == ["", ""]
    assert cli.read_lines("grüße\n".encode()) == ["grüße"]


@pytest.mark.faults
def test_cli_falls_back_from_a_damaged_newest_checkpoint(workdir, monkeypatch, capsys, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    newest = copy / "checkpoints" / str(2 * TRAINED_CHECKPOINT_EVERY)
    damaged = [f for f in newest.glob("params/**/*") if f.is_file() and "ocdbt" in str(f)]
    assert damaged
    for f in damaged:  # truncated after the fact, as in tests/checkpoints/test_damaged.py
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    code, out, err = run_main(monkeypatch, capsys, ["--workdir", str(copy), "--beam", "1"],
                              b"seven\n")
    assert code == 0, err
    assert out == Translator.from_workdir(workdir, step=TRAINED_CHECKPOINT_EVERY).translate(
        ["seven"], beam_size=1)[0] + "\n"
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert (f"checkpoint step {2 * TRAINED_CHECKPOINT_EVERY}" in warnings[0]
            and f"using step {TRAINED_CHECKPOINT_EVERY}" in warnings[0])
    assert newest.is_dir()  # reading never moves a checkpoint


# Run as ``python -m transformer_jax.translate`` would (``__main__``), then list the modules
# the process imported. The training pipeline's libraries take seconds to import.
_IMPORTS_PROBE = """
import runpy, sys
sys.argv = ["translate", *sys.argv[1:]]
try:
    runpy.run_module("transformer_jax.translate", run_name="__main__")
except SystemExit as stop:
    code = stop.code
roots = sorted({name.split(".")[0] for name in sys.modules})
print("exit", code, "modules", " ".join(roots), file=sys.stderr)
"""
TRAINING_ONLY = ("grain", "tensorflow_datasets", "tensorflow", "sacremoses", "sacrebleu")


def test_cli_process_imports_no_training_pipeline(workdir):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TRANSFORMER_JAX_MALLOC="default")
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORTS_PROBE, "--workdir", workdir, "--beam", "1",
         "--compile_cache", "none"],
        input=b"seven\n", capture_output=True, env=env, timeout=300, check=False)
    last = proc.stderr.decode().strip().splitlines()[-1]
    assert last.startswith("exit 0 modules "), proc.stderr.decode()
    assert proc.stdout.decode().count("\n") == 1  # the model translated the line
    imported = set(last.split()[3:])
    assert {"jax", "sentencepiece"} <= imported  # the probe sees what the command used
    assert imported.isdisjoint(TRAINING_ONLY), sorted(imported.intersection(TRAINING_ONLY))
