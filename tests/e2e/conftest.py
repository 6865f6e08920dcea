"""Session fixtures: one prepared numbers dataset and one uninterrupted reference run."""

import shutil

import pytest
from helpers import final_params, run_train


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Prepared TFDS data shared by every run of the session (the first run writes it)."""
    return str(tmp_path_factory.mktemp("reliability_data"))


@pytest.fixture(scope="session")
def reference(tmp_path_factory, data_dir):
    """An uninterrupted run: ``(workdir, params of its last checkpoint)``."""
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    proc = run_train(workdir, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, final_params(workdir)


@pytest.fixture
def reference_copy(reference, tmp_path):
    """A private copy of the reference work directory (to damage)."""
    dst = str(tmp_path / "run")
    shutil.copytree(reference[0], dst)
    return dst

