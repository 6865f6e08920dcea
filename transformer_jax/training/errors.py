"""Exceptions for problems the user can fix; the command line prints them as one line."""

from __future__ import annotations

__all__ = ["CheckpointMismatchError", "ConfigError", "TrainingDivergedError", "WorkdirError"]


class ConfigError(ValueError):
    """The training config has an unknown key or an invalid value."""


class CheckpointMismatchError(ValueError):
    """A checkpoint was written for a different model/optimizer than the config asks for."""


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class WorkdirError(ValueError):
    """The work directory cannot be created or written (read-only, not a directory, full)."""


def override_error(argv: list[str], err: Exception) -> str:
    """One-line message for ``--config.*`` command-line overrides that could not be applied.

    An override naming a key the config does not have gets the same message as a config file
    with that key (``unknown config key ...; the ... keys are: ...``).
    """
    from transformer_jax.training.defaults import validate_config

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
