"""Train and evaluate a Transformer: ``python train.py --config configs/default.py --workdir W``.

Any config value can be overridden, e.g. ``--config.model.num_layers=2
--config.optimizer.learning_rate=2.0``. Running again with the same --workdir resumes from
its newest checkpoint. SIGTERM/Ctrl-C saves a checkpoint and exits 0.

Several processes (hosts): run the same command on each, with
``--config.distributed.coordinator_address=HOST:PORT --config.distributed.num_processes=N
--config.distributed.process_id=I`` or under a launcher that JAX detects (SLURM, mpirun,
Cloud TPU, ``JAX_COORDINATOR_ADDRESS``); see docs/multi_host.md. SIGTERM to any one process
stops all of them after the same update, with one checkpoint.

Exit codes: 0 done (or interrupted and saved), 1 training diverged (NaN/inf loss), another
process failed or a checkpoint could not be read for a reason other than damage, 2 a problem
with the config, the data or the work directory (one-line message on stderr).
"""

import logging as std_logging
import os
import sys

from transformer_jax.runtime import configure_malloc, defer_stop_signals, skip_absent_tpu

if __name__ == "__main__":
    # Re-executes this command once with glibc malloc settings that keep XLA's per-step
    # buffers mapped (transformer_jax/runtime.py): first, so JAX is imported only once.
    configure_malloc()
    skip_absent_tpu()  # libtpu installed but no TPU here: no probe, no libtpu error
    defer_stop_signals()  # a SIGTERM while importing stops the run at its first update

from absl import app, flags, logging
from ml_collections import config_flags

from transformer_jax.errors import (
    CheckpointReadError,
    ConfigError,
    DistributedError,
    TrainingDivergedError,
)
from transformer_jax.training import train_and_evaluate, validate_config

_FLAG_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError)


def override_error(argv: list[str], err: Exception) -> str:
    """One-line message for ``--config.*`` command-line overrides that could not be applied.

    An override naming a key the config does not have gets the same message as a config file
    with that key (``unknown config key ...; the ... keys are: ...``).
    """
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config."):].split("=", 1)[0].split(".")
        nested: dict = {}
        node = nested
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = 0
        try:
            validate_config(nested)
        except ConfigError as key_err:
            if "unknown config key" in str(key_err):
                return str(key_err)
        except Exception:  # noqa: BLE001 - only unknown keys are diagnosed here
            pass
    text = " ".join(str(err).split()) or type(err).__name__
    return f"cannot apply the --config flags ({text}); check the names and values."


def _flag_error(err: Exception):
    """A --config.* override that cannot be applied: one line on stderr, exit code 2."""
    print(f"error: {override_error(sys.argv, err)}", file=sys.stderr)
    sys.exit(2)


_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")
try:  # overrides of the default config file are applied here, at definition
    _CONFIG = config_flags.DEFINE_config_file(
        "config", _DEFAULT_CONFIG, "Training config file (a python file with get_config()).",
        lock_config=True)
except _FLAG_ERRORS as _err:
    _flag_error(_err)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _WORKDIR.value:
        print("error: --workdir is required (a directory for checkpoints and outputs).",
              file=sys.stderr)
        return 2
    logging.set_verbosity(logging.WARNING)
    std_logging.getLogger("absl").setLevel(std_logging.ERROR)  # TFDS/orbax chatter, not ours
    try:
        # Checks every key before anything touches the disk or the network, then connects
        # the processes of a multi-process job (explicit distributed.* keys or the
        # launcher's environment; a single process skips this) and trains.
        summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (TrainingDivergedError, DistributedError, CheckpointReadError) as err:
        print(f"error: {err}", file=sys.stderr)  # every process says why it stopped
        return 1
    except (ValueError, OSError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    if summary.get("interrupted"):
        print(f"interrupted at step {summary['step']}; checkpoint saved in {_WORKDIR.value}")
    else:
        print(_describe(summary))
    return 0


def _describe(summary: dict) -> str:
    parts = [f"done: step {summary['step']}", f"{summary['wall_seconds']:.0f} s"]
    for split in ("eval", "test"):
        metrics = summary.get(split) or {}
        scores = ", ".join(f"{k} {metrics[k]:.2f}" for k in
                           ("loss", "exact_match", "chrf", "bleu") if k in metrics)
        by_magnitude = ", ".join(f"{k.removeprefix('exact_match_')} {v:.1f}"
                                 for k, v in metrics.items() if k.startswith("exact_match_"))
        if by_magnitude:
            scores += f" (exact_match by magnitude: {by_magnitude})"
        if scores:
            parts.append(f"{split}: {scores}")
    parts.append(f"outputs in {summary['workdir']}")
    return "; ".join(parts)


def _parse_flags(argv):
    """absl's parsing, but a bad --config.* override is one line on stderr and exit code 2."""
    try:
        return flags.FLAGS(argv)
    except _FLAG_ERRORS as err:
        _flag_error(err)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
