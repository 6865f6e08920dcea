"""A damaged newest checkpoint: the run resumes from the newest valid one with a one-line
warning and ends bit-identical to an uninterrupted run; nothing readable left is an error."""

import glob
import os
import shutil

import pytest
from helpers import (
    RUN_STEPS,
    assert_bit_identical,
    checkpoint_entries,
    error_line,
    final_params,
    run_train,
)

pytestmark = pytest.mark.faults  # the fault-injection table in docs/errors.md


def _truncate_params(step_dir):
    files = [f for f in glob.glob(os.path.join(step_dir, "params", "**", "*"), recursive=True)
             if os.path.isfile(f) and "ocdbt" in f]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)


def _delete_params_data(step_dir):
    data = os.path.join(step_dir, "params", "ocdbt.process_0")
    assert os.path.isdir(data)
    shutil.rmtree(data)


def _leave_incomplete(step_dir):
    """What a kill during orbax's asynchronous save leaves: a temporary directory."""
    os.remove(os.path.join(step_dir, "commit_success.txt"))
    os.rename(step_dir, step_dir + ".orbax-checkpoint-tmp")


@pytest.mark.parametrize("damage", [_truncate_params, _delete_params_data, _leave_incomplete],
                         ids=["truncated", "deleted", "incomplete"])
def test_damaged_newest_checkpoint_falls_back(damage, data_dir, reference, reference_copy):
    workdir = reference_copy
    ckpt = os.path.join(workdir, "checkpoints")
    want = [RUN_STEPS - 4, RUN_STEPS - 2, RUN_STEPS]
    assert sorted(int(e) for e in checkpoint_entries(workdir)) == want
    damage(os.path.join(ckpt, str(RUN_STEPS)))

    proc = run_train(workdir, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from step {RUN_STEPS - 2}" in proc.stdout
    warnings = [ln for ln in proc.stderr.splitlines() if f"{RUN_STEPS}" in ln and (
        "cannot be read" in ln or "incomplete checkpoint" in ln)]
    assert len(warnings) == 1, proc.stderr
    if damage is _leave_incomplete:
        incomplete = f"{ckpt}/{RUN_STEPS}.orbax-checkpoint-tmp"
        assert f"removing incomplete checkpoint {incomplete}" in warnings[0]
    else:
        moved = os.path.join(workdir, "corrupt_checkpoints", str(RUN_STEPS))
        assert f"checkpoint step {RUN_STEPS} cannot be read (" in warnings[0]
        assert warnings[0].endswith(f"moved it to {moved} and resuming from step {RUN_STEPS - 2}")
        assert os.path.isdir(moved)
    assert sorted(checkpoint_entries(workdir)) == sorted(
        str(s) for s in (RUN_STEPS - 4, RUN_STEPS - 2, RUN_STEPS))
    assert_bit_identical(final_params(workdir), reference[1])


def test_no_readable_checkpoint_is_a_one_line_error(data_dir, reference_copy):
    workdir = reference_copy
    for entry in checkpoint_entries(workdir):
        os.remove(os.path.join(workdir, "checkpoints", entry, "meta", "metadata"))
    before = sorted(os.listdir(workdir))
    proc = run_train(workdir, data_dir)
    line = error_line(proc)
    assert proc.returncode == 2
    assert line.startswith(f"error: no checkpoint in {workdir}/checkpoints can be read (step "
                           f"{RUN_STEPS}: ")
    assert line.endswith("move the damaged step directories away or use a fresh --workdir.")
    assert sorted(os.listdir(workdir)) == before  # nothing moved or deleted


@pytest.mark.parametrize("damage", [_truncate_params, _delete_params_data],
                         ids=["truncated", "deleted"])
def test_translate_falls_back_from_a_damaged_newest_checkpoint(damage, reference_copy, capsys):
    """Inference judges damage as training's resume does: the step before, with a warning; a
    step asked for by number is never replaced."""
    from transformer_jax.inference import Translator

    damage(os.path.join(reference_copy, "checkpoints", str(RUN_STEPS)))
    capsys.readouterr()
    translator = Translator.from_workdir(reference_copy)
    err = capsys.readouterr().err.strip().splitlines()
    assert translator.step == RUN_STEPS - 2
    assert len(err) == 1 and err[0].startswith(
        f"warning: checkpoint step {RUN_STEPS} in {reference_copy}")
    assert "cannot be read (" in err[0]
    assert err[0].endswith(f"using step {RUN_STEPS - 2}.")
    with pytest.raises(Exception):  # noqa: B017, PT011 - whatever orbax raises, not a fallback
        Translator.from_workdir(reference_copy, step=RUN_STEPS)
