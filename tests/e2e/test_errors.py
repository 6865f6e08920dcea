"""Every mistake a person can make gets exactly one line on stderr (no traceback), exit code 2
and leaves nothing half-written behind: the exact message is part of the interface."""

import os
import shlex
import sys

import pytest
from helpers import error_line, run, run_train, train_cmd

from transformer_jax.training import default_config

TOP_KEYS = ", ".join(sorted(default_config().to_dict()))
MODEL_KEYS = ", ".join(sorted(default_config().model.to_dict()))


def _aligned(directory, src_lines, tgt_lines, src_bytes=None):
    os.makedirs(directory)
    for split in ("train", "validation"):
        with open(os.path.join(directory, f"{split}.en"), "wb") as f:
            f.write(src_bytes if src_bytes is not None and split == "train"
                    else "".join(f"{s}\n" for s in src_lines).encode())
        with open(os.path.join(directory, f"{split}.de"), "wb") as f:
            f.write("".join(f"{t}\n" for t in tgt_lines).encode())
    return directory


def _text_run(tmp_path, path):
    workdir, data_dir = str(tmp_path / "run"), str(tmp_path / "data")
    proc = run_train(workdir, data_dir, data__source="text", data__path=path)
    assert not os.path.exists(workdir), os.listdir(workdir)
    assert not os.path.exists(data_dir)
    return error_line(proc), proc


def test_missing_data_dir(tmp_path):
    path = str(tmp_path / "nowhere")
    line, proc = _text_run(tmp_path, path)
    assert proc.returncode == 2
    assert line == (f"error: Data directory '{path}' does not exist; set data.path to a directory "
                    "holding aligned files named {split}.en and {split}.de.")


def test_mismatched_line_counts(tmp_path):
    d = _aligned(str(tmp_path / "text"), ["one", "two", "three"], ["eins", "zwei"])
    line, proc = _text_run(tmp_path, d)
    assert proc.returncode == 2
    assert line == (f"error: {d}/train.en has 3 lines but {d}/train.de has 2; aligned files need "
                    "the same number of lines (line i of one is the translation of line i of "
                    "the other).")


def test_empty_file(tmp_path):
    d = _aligned(str(tmp_path / "text"), ["one", "two"], ["eins", "zwei"], src_bytes=b"")
    line, proc = _text_run(tmp_path, d)
    assert proc.returncode == 2
    assert line == (f"error: {d}/train.en is empty; it must hold one sentence per line, aligned "
                    f"line by line with {d}/train.de.")


def test_invalid_utf8(tmp_path):
    d = _aligned(str(tmp_path / "text"), ["one", "two"], ["eins", "zwei"],
                 src_bytes=b"one\ntw\xffo\n")
    line, proc = _text_run(tmp_path, d)
    assert proc.returncode == 2
    assert line == (f"error: {d}/train.en:2 is not valid UTF-8 (byte b'\\xff' at column 3); "
                    "re-encode the file as UTF-8, e.g. with `iconv -f LATIN1 -t UTF-8`.")


@pytest.mark.parametrize("flag,key,known", [
    ("--config.num_train_step=5", "num_train_step", f"the top-level keys are: {TOP_KEYS}"),
    ("--config.model.d_modl=64", "model.d_modl", f"the model keys are: {MODEL_KEYS}"),
])
def test_unknown_config_key_flag(flag, key, known, tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    proc = run([*train_cmd(workdir, data_dir), flag])
    assert error_line(proc) == f"error: unknown config key {key!r}; {known}."
    assert proc.returncode == 2
    assert not os.path.exists(workdir)


def test_unknown_config_key_in_config_file(tmp_path, data_dir):
    config = tmp_path / "typo.py"
    config.write_text("from transformer_jax.training import default_config\n\n\n"
                      "def get_config():\n    c = default_config()\n"
                      "    c.num_train_step = 5\n    return c\n")
    workdir = str(tmp_path / "run")
    cmd = train_cmd(workdir, data_dir)
    proc = run([*cmd[:3], f"--config={config}", *cmd[3:]])  # the file before its overrides
    assert error_line(proc) == (f"error: unknown config key 'num_train_step'; the top-level keys "
                                f"are: {TOP_KEYS}.")
    assert proc.returncode == 2
    assert not os.path.exists(workdir)


def test_d_model_not_divisible_by_heads(tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    proc = run_train(workdir, data_dir, model__d_model=30, model__num_heads=4)
    assert error_line(proc) == ("error: model config: d_model=30 is not divisible by "
                                "num_heads=4; choose num_heads that divides d_model.")
    assert proc.returncode == 2
    assert not os.path.exists(workdir)


def _snapshot(root):
    """Every file but the lock file (where each run records itself as the holder)."""
    return sorted((os.path.relpath(os.path.join(d, f), root),
                   os.stat(os.path.join(d, f)).st_size, os.stat(os.path.join(d, f)).st_mtime_ns)
                  for d, _, files in os.walk(root) for f in files if f != ".lock")


def test_checkpoint_config_mismatch(data_dir, reference_copy):
    workdir = reference_copy
    before = _snapshot(workdir)
    proc = run_train(workdir, data_dir, model__d_model=64)
    assert error_line(proc) == (f"error: checkpoint in {workdir} was written for d_model=32 but "
                                "the config asks for d_model=64; use a fresh --workdir or the "
                                "matching config.")
    assert proc.returncode == 2
    assert _snapshot(workdir) == before


def test_batch_not_divisible_by_devices(tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    proc = run_train(workdir, data_dir, devices=8, parallelism="pmap", batch_size=12)
    assert error_line(proc) == ("error: batch_size=12 is not divisible by the 8 devices; use a "
                                "multiple of 8.")
    assert proc.returncode == 2
    assert not os.path.exists(workdir)


def test_workdir_under_a_file(tmp_path, data_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    workdir = str(blocker / "run")
    proc = run_train(workdir, data_dir)
    assert error_line(proc) == (f"error: cannot write to the work directory {workdir} (Not a "
                                "directory); choose a --workdir on a writable file system with "
                                "free space.")
    assert proc.returncode == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories anyway")
def test_read_only_workdir(tmp_path, data_dir):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    workdir = str(parent / "run")
    try:
        proc = run_train(workdir, data_dir)
    finally:
        parent.chmod(0o755)
    assert error_line(proc) == (f"error: cannot write to the work directory {workdir} "
                                "(Permission denied); choose a --workdir on a writable file "
                                "system with free space.")
    assert proc.returncode == 2
    assert not os.path.exists(workdir)


def test_writes_fail_before_training(tmp_path, data_dir, reference):
    """A 2 KiB file-size limit (writes fail with EFBIG) stands in for a full disk, without root
    or mounts. The data is prepared already (``reference``); the run's first write fails."""
    workdir = str(tmp_path / "run")
    script = f"trap '' XFSZ; ulimit -f 2; exec {shlex.join(train_cmd(workdir, data_dir))}"
    proc = run(["bash", "-c", script])
    assert error_line(proc) == (f"error: cannot write to the work directory {workdir} (File too "
                                "large); choose a --workdir on a writable file system with free "
                                "space.")
    assert proc.returncode == 2
    assert not os.path.exists(workdir)


def test_translate_invalid_utf8_input(reference):
    """The translate command reads stdin as UTF-8 and names the first bad line."""
    proc = run([sys.executable, "-m", "transformer_jax.translate", "--workdir", reference[0]],
               input=b"one\n\ntwo \xc3\x28 three\nfour\n", text=False)
    proc.stderr = proc.stderr.decode()
    assert proc.stdout == b""
    assert error_line(proc) == ("error: line 3 of the input is not valid UTF-8 (byte 0xc3 at "
                                "column 5); convert it to UTF-8, e.g. with iconv -t UTF-8.")
    assert proc.returncode == 1


@pytest.mark.parametrize("flag,message", [
    ("--config.optimizer.name=sgd",
     "error: optimizer.name='sgd' is unknown; choose one of adam, adamw."),
    ("--config.checkpoint_every_steps=0",
     "error: checkpoint_every_steps=0 is not allowed; a checkpoint is always written at the "
     "end, so set checkpoint_every_steps to num_train_steps to save only there."),
    ("--config.model.pad_id=5",
     "error: model.pad_id=5 is not supported for training: the data pipeline and the tokenizer "
     "pad with id 0; set model.pad_id=0."),
    ("--config.seed=4294967296",
     "error: seed=4294967296 must be below 2**32 (4294967296); choose a seed in [0, 2**32)."),
    ("--config.eval_length_penalty=nan",
     "error: eval_length_penalty=nan is not a finite number; give a finite value."),
    ("--config.optimizer.weight_decay=0.1",
     "error: optimizer.weight_decay=0.1 has no effect with optimizer.name='adam'; use "
     "optimizer.name='adamw' for weight decay or set optimizer.weight_decay=0."),
])
def test_config_values_are_refused_before_anything_is_written(flag, message, tmp_path):
    workdir, data_dir = str(tmp_path / "run"), str(tmp_path / "data")
    proc = run([*train_cmd(workdir, data_dir), flag])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert error_line(proc) == message
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(workdir) and not os.path.exists(data_dir)
