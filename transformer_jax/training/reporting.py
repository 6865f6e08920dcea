"""Run outputs in the work directory: config/summary JSON, metric history, TensorBoard, PNG.

Only process 0 writes these files. JSON files are written to a temporary name and renamed,
so a reader never sees half a file.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping

__all__ = [
    "mean_metrics",
    "History",
    "MetricWriter",
    "plot_learning_curve",
    "write_json",
]

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
HISTORY_FILE = "history.jsonl"
CURVE_FILE = "learning_curve.png"
TENSORBOARD_DIR = "tensorboard"


def _temp_beside(path: str):
    """A new file next to ``path`` with a unique name (``mkstemp``: process ids repeat across
    the hosts of a pod); returns ``(file object, its path)``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-",
                               dir=os.path.dirname(os.path.abspath(path)))
    return os.fdopen(fd, "w", encoding="utf-8"), tmp


def write_json(path: str, payload: Mapping) -> None:
    """Atomically write ``payload`` as indented JSON."""
    f, tmp = _temp_beside(path)
    with f:
        json.dump(payload, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


class History:
    """Append-only ``history.jsonl``: one line ``{"step", "split", metrics...}`` per log point.

    On resume the lines after the restored step are dropped, so the curve matches the state.
    Only an ``enabled`` history (process 0's) writes the file.
    """

    def __init__(self, workdir: str, resume_step: int | None, *, enabled: bool = True):
        self.path = os.path.join(workdir, HISTORY_FILE)
        self.enabled = enabled
        self.rows: list[dict] = []
        if resume_step is not None and os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if line:
                        row = json.loads(line)
                        if row.get("step", 0) <= resume_step:
                            self.rows.append(row)
        self._rewrite()

    def _rewrite(self) -> None:
        if not self.enabled:
            return
        f, tmp = _temp_beside(self.path)
        with f:
            for row in self.rows:
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, self.path)

    def add(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        row = {"step": int(step), "split": split, **{k: float(v) for k, v in metrics.items()}}
        self.rows.append(row)
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def series(self, split: str, key: str) -> tuple[list[int], list[float]]:
        rows = [r for r in self.rows if r["split"] == split and key in r]
        return [r["step"] for r in rows], [r[key] for r in rows]


class MetricWriter:
    """TensorBoard scalars via tensorboardX (no TensorFlow needed)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))

    def scalars(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        if self._writer is None:
            return
        for key, value in metrics.items():
            if isinstance(value, int | float) and math.isfinite(value):
                self._writer.add_scalar(f"{split}/{key}", value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def plot_learning_curve(history: History, path: str, metric_names=()) -> None:
    """Loss curves (train, eval) and decoding metrics against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extra = [m for m in metric_names if history.series("eval", m)[0]]
    fig, axes = plt.subplots(1, 1 + bool(extra), figsize=(6 + 5 * bool(extra), 4), squeeze=False)
    ax = axes[0, 0]
    for split, key, style in (("train", "loss", "-"), ("train", "nll", ":"),
                              ("eval", "loss", "o-"), ("eval", "nll", "s:")):
        steps, values = history.series(split, key)
        if steps:
            ax.plot(steps, values, style, label=f"{split} {key}", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss per target token")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    if extra:
        ax2 = axes[0, 1]
        for name in extra:
            steps, values = history.series("eval", name)
            ax2.plot(steps, values, "o-", label=name, markersize=3)
        ax2.set_xlabel("step")
        ax2.set_ylabel("score (0-100)")
        ax2.grid(alpha=0.3)
        ax2.legend()
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Token-weighted means of per-step metrics; token counts summed."""
    tokens = sum(r["tokens"] for r in rows)
    out = {}
    for key in ("loss", "nll", "accuracy"):
        out[key] = sum(r[key] * r["tokens"] for r in rows) / max(tokens, 1.0)
    out["grad_norm"] = sum(r["grad_norm"] for r in rows) / len(rows)
    out["learning_rate"] = rows[-1]["learning_rate"]
    out["tokens"] = tokens
    out["src_tokens"] = sum(r["src_tokens"] for r in rows)
    return out
