"""Executes every notebook under notebooks/ top to bottom and checks the figures it writes.

Each notebook reads its parameters from ``NB_*`` environment variables; here they are set to
small values (few training steps, a fresh workdir in a temporary folder) and ``NB_OUT_DIR``
points at a temporary folder where every figure must appear as a non-blank PNG.

Select with ``pytest -m notebooks``; deselect with ``-m "not notebooks"``. To run notebook 02
on an existing trained workdir instead of a fresh short run, set ``NB_WORKDIR`` before pytest.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

pytestmark = pytest.mark.notebooks

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
MIN_PNG_BYTES = 5_000

# A short run of the default config: a small numbers dataset, 150 updates, few sentences
# decoded. ``{tmp}`` is the test's temporary folder (braces of the JSON are doubled).
_NB02_OVERRIDES = (
    '{{"data.numbers_train_size": 5000, "data.numbers_validation_size": 64, '
    '"data.numbers_test_size": 64, "eval_num_sentences": 32, "eval_every_steps": 0, '
    '"log_every_steps": 25}}'
)

# notebook -> (figures it must write to NB_OUT_DIR, extra environment for a short CI run)
NOTEBOOKS = {
    "01_attention_from_scratch.ipynb": (
        [
            "sinusoidal_heatmap.png",
            "pe_dot_distance.png",
            "masks.png",
            "attention_weights.png",
            "rope_vs_alibi.png",
        ],
        {},
    ),
    "02_train_translate_inspect.ipynb": (
        ["training_curves.png", "cross_attention_heads.png", "cross_attention_mean.png"],
        {
            "NB_WORKDIR": "{tmp}/run",
            "NB_TRAIN_STEPS": "150",
            "NB_OVERRIDES": _NB02_OVERRIDES,
            "NB_NUM_EXAMPLES": "8",
            "NB_NUM_SCORED": "8",  # same batch shape as the examples: no extra compilation
        },
    ),
    "03_research_api.ipynb": (
        ["jacobian_structure.png", "positional_loss_curves.png", "attention_memory.png"],
        {"NB_TRAIN_STEPS": "30", "NB_NUM_LAYERS": "1", "NB_MEM_LENGTHS": "512,1024,2048"},
    ),
    "04_marian_interop.ipynb": (["marian_cross_attention.png"], {"NB_WORKDIR": "{tmp}/marian"}),
}


def _kernel_manager(spec_root: Path) -> KernelManager:
    """A kernel manager whose "python3" kernel is this interpreter (the project's venv).

    A user-wide ``python3`` kernelspec would otherwise win and could point at another Python.
    """
    spec_dir = spec_root / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (tests)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    ksm = KernelSpecManager(kernel_dirs=[str(spec_root / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name="python3", kernel_spec_manager=ksm)


def _check_png(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.is_file(), f"the notebook did not write {path.name}"
    size = path.stat().st_size
    assert size > MIN_PNG_BYTES, f"{path.name} is only {size} bytes; expected a real figure"
    image = mpimg.imread(path)  # [rows, cols, channels] floats in [0, 1]
    assert image.ndim == 3 and min(image.shape[:2]) > 100, f"{path.name}: shape {image.shape}"
    rgb = image[..., :3]
    background = np.median(rgb.reshape(-1, 3), axis=0)
    differs = np.abs(rgb - background).max(axis=-1) > 0.1
    assert differs.mean() > 0.01, f"{path.name} looks blank ({differs.mean():.2%} non-background)"


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs_and_writes_figures(name, tmp_path, monkeypatch):
    figures, env = NOTEBOOKS[name]
    out_dir = tmp_path / "figures"
    monkeypatch.setenv("NB_OUT_DIR", str(out_dir))
    for key, value in env.items():
        if key not in os.environ:  # an explicit setting (e.g. a trained NB_WORKDIR) wins
            monkeypatch.setenv(key, value.format(tmp=tmp_path))
    # The kernel inherits this environment; run it as a user would, on one CPU device.
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")

    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        km=_kernel_manager(tmp_path / "kernelspec"),
        timeout=300,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()  # raises CellExecutionError naming the failing cell

    for figure in figures:
        _check_png(out_dir / figure)
    if name.startswith("02_") and "NB_WORKDIR" not in os.environ:
        _check_short_training(tmp_path / "run")


def _check_short_training(workdir: Path) -> None:
    """The notebook's 150-update run learned the task (measured: token accuracy 0.93, exact
    match 73% on the 64 test sentences, train NLL 5.6 -> 0.94)."""
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["step"] == 150
    assert summary["test"]["accuracy"] > 0.8, summary["test"]
    assert summary["test"]["exact_match"] > 30, summary["test"]
    history = [json.loads(line) for line in (workdir / "history.jsonl").read_text().splitlines()]
    losses = [row["nll"] for row in history if row["split"] == "train"]
    assert losses[-1] < 0.5 * losses[0], losses


def test_every_notebook_is_tested_and_stored_without_outputs():
    on_disk = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))
    assert on_disk == sorted(NOTEBOOKS), "add new notebooks to NOTEBOOKS in this test"
    for name in on_disk:
        nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, (
                    f"{name} is committed with outputs; clear them before committing"
                )
        first_code = next(c for c in nb.cells if c.cell_type == "code")
        assert "NB_OUT_DIR" in first_code.source, f"{name}: parameters belong in the first cell"
