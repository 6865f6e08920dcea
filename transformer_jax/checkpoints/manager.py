"""Saving and restoring the training state of a work directory (``Checkpointer``).

Writes go through orbax's temporary directory (``<step>.orbax-checkpoint-tmp``) + rename, so
a crash never leaves a half-written ``<step>`` behind; nothing is pickled (``layout`` has the
directory layout). Saves are asynchronous: call ``wait()`` (or ``close()``) before relying on
the files.

Resuming (:meth:`Checkpointer.restore_latest`) uses the newest checkpoint that can be read:
temporary directories left by an interrupted save are removed, and a damaged step (a file
truncated or deleted after the fact) is moved to ``<workdir>/corrupt_checkpoints/<step>``;
each with a one-line warning. Every process takes part and every decision is agreed on.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import shutil
from collections.abc import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from transformer_jax.checkpoints.damage import CorruptCheckpointError, is_corruption
from transformer_jax.checkpoints.layout import (
    CHECKPOINT_DIR,
    CORRUPT_DIR,
    INCOMPLETE_MARK,
    check_compatible,
    one_line,
    open_manager,
)
from transformer_jax.checkpoints.read import read_meta
from transformer_jax.errors import CheckpointMismatchError, CheckpointReadError
from transformer_jax.parallel.coordination import agree, chief_first, from_chief
from transformer_jax.parallel.processes import DEFAULT_BARRIER_TIMEOUT_S

__all__ = ["Checkpointer"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- JSON helpers
def _jsonable(value):
    """Make an iterator state JSON-safe (bytes -> base64, numpy -> python)."""
    if isinstance(value, bytes):
        return {"__bytes_b64__": base64.b64encode(value).decode("ascii")}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _unjsonable(value):
    if isinstance(value, Mapping):
        if set(value) == {"__bytes_b64__"}:
            return base64.b64decode(value["__bytes_b64__"])
        return {k: _unjsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unjsonable(v) for v in value]
    return value


def _key_to_json(key) -> dict:
    return {
        "impl": str(jax.random.key_impl(key)),
        "data": np.asarray(jax.random.key_data(key)).tolist(),
    }


def _key_from_json(blob: Mapping) -> jax.Array:
    return jax.random.wrap_key_data(np.asarray(blob["data"], np.uint32), impl=blob["impl"])


# --------------------------------------------------------------------------- manager
def _abstract(tree, shardings):
    """ShapeDtypeStructs of ``tree`` with ``shardings`` (default: the first local device)."""
    if shardings is None:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: one, tree)
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings
    )


# Outcomes of trying one checkpoint, ordered: the processes act on the largest.
_OK, _CORRUPT, _MISMATCH, _FATAL = range(4)


def _stop_error(step: int, err, mine: int, outcomes: list[int], directory: str) -> Exception:
    """The error every process raises when a checkpoint fails for a reason other than damage
    (``mine``: this process's outcome, ``outcomes``: every process's)."""
    if err is not None and mine == max(outcomes):
        if mine == _MISMATCH:
            return err
        return CheckpointReadError(
            f"checkpoint step {step} in {directory} could not be read ({type(err).__name__}: "
            f"{one_line(err)}); it is not damaged, so it was left in place: fix the cause "
            "(memory, file system) and run again."
        )
    return CheckpointReadError(
        f"checkpoint step {step} in {directory} could not be read on process "
        f"{outcomes.index(max(outcomes))} (see its log); the checkpoints were left in place."
    )


class Checkpointer:
    """Saves and restores the training state of one work directory.

    Args:
      workdir: the run's work directory (checkpoints go to ``<workdir>/checkpoints``).
      keep: how many recent checkpoints to keep (None keeps all).
      async_save: write in a background thread after copying arrays to host.
      barrier_timeout_s: how long a process waits for the others at restore's barriers
        (default: the ``distributed.barrier_timeout`` of the config given to
        :meth:`restore_latest`, else ``DEFAULT_BARRIER_TIMEOUT_S``).
    """

    def __init__(self, workdir: str, *, keep: int | None = None, async_save: bool = True,
                 barrier_timeout_s: float | None = None):
        self.workdir = os.path.abspath(workdir)
        self._barrier_timeout_s = barrier_timeout_s
        self.directory = os.path.join(self.workdir, CHECKPOINT_DIR)
        self._options = {"keep": keep, "async_save": async_save}
        self._manager = open_manager(self.directory, **self._options)

    def _remove_incomplete(self) -> None:
        """Delete temporary directories of saves that a crash interrupted."""
        if jax.process_index() != 0 or not os.path.isdir(self.directory):
            return
        for name in sorted(os.listdir(self.directory)):
            if INCOMPLETE_MARK in name:
                log.warning("removing incomplete checkpoint %s (its save was interrupted)",
                            os.path.join(self.directory, name))
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def _chief_steps(self) -> list[int]:
        """Process 0's steps, newest first, once the interrupted saves are removed."""
        self._remove_incomplete()
        return sorted(self.all_steps(), reverse=True)

    def latest_meta(self) -> tuple[int, dict] | None:
        """``(step, meta)`` of the newest checkpoint whose metadata can be read, or None."""
        for step in sorted(self.all_steps(), reverse=True):
            try:
                return step, read_meta(self.directory, step)
            except Exception:  # noqa: BLE001 - damaged; restore_latest reports it
                continue
        return None

    def restore_latest(self, template_state, *, config: Mapping | None = None,
                       shardings=None):
        """Restore the newest readable checkpoint (see :meth:`restore`); None when there is none.

        Call it before the first save of a run, on every process: it first deletes the
        temporary directories of saves that a crash interrupted (one warning line each). The
        processes try the chief's list of steps, newest first, and agree after each try: a
        checkpoint that is damaged (missing, short or undecodable files) on any process while
        an older one can be read is moved to ``<workdir>/corrupt_checkpoints`` with a one-line
        warning. Any other error (memory, a file system error, a config mismatch) stops every
        process and leaves the checkpoints alone. When none can be read, the newest one's
        error is raised as a one-line ``CheckpointMismatchError``.
        """
        timeout_s = self._timeout_s(config)
        steps = from_chief("checkpoint-steps", self._chief_steps, timeout_s=timeout_s)
        failed: list[tuple[int, Exception]] = []
        for step in steps:
            restored, err, mine = self._try_restore(template_state, step, config, shardings)
            outcomes = agree(mine)  # one per process: every process decides alike
            worst = max(outcomes)
            if worst == _CORRUPT:
                failed.append((step, err or RuntimeError(
                    f"damaged as seen by process {outcomes.index(_CORRUPT)}")))
                continue
            if worst != _OK:
                raise _stop_error(step, err, mine, outcomes, self.directory)
            if failed:  # the chief moves them (an error there reaches every process)
                chief_first(lambda: [self._set_aside(bad, bad_err, step)  # noqa: B023
                                     for bad, bad_err in failed],
                            "checkpoints-set-aside", timeout_s=timeout_s)
                self._manager.close()  # and every process lists again
                self._manager = open_manager(self.directory, **self._options)
            return restored
        if failed:
            step, err = failed[0]
            raise CheckpointMismatchError(
                f"no checkpoint in {self.directory} can be read (step {step}: {one_line(err)});"
                " move the damaged step directories away or use a fresh --workdir."
            )
        return None

    def _timeout_s(self, config: Mapping | None) -> float:
        """The barrier timeout: the constructor's, the config's, or the default."""
        if self._barrier_timeout_s is not None:
            return float(self._barrier_timeout_s)
        timeout = ((config or {}).get("distributed") or {}).get("barrier_timeout")
        return float(timeout) if timeout else DEFAULT_BARRIER_TIMEOUT_S

    def _try_restore(self, template_state, step, config, shardings):
        """``(restored, None, _OK)`` or ``(None, error, outcome)``; never raises for a bad
        checkpoint (the outcome is agreed on by every process first).

        A step that looks damaged is listed again and tried once more first: a network file
        system may not show this process a step that another process wrote a moment ago.
        """
        outcome = self._try_restore_once(template_state, step, config, shardings)
        if outcome[2] != _CORRUPT:
            return outcome
        log.info("checkpoint step %d looks damaged (%s); listing %s again and retrying once",
                 step, one_line(outcome[1]), self.directory)
        for path in (self.directory, os.path.join(self.directory, str(step))):
            with contextlib.suppress(OSError):  # listing refreshes the file system's view
                os.listdir(path)
        self._manager.reload()
        return self._try_restore_once(template_state, step, config, shardings)

    def _try_restore_once(self, template_state, step, config, shardings):
        try:
            meta = read_meta(self.directory, step)
            if config is not None:
                check_compatible(meta.get("config", {}), config, self.workdir)
            return self.restore(template_state, step, shardings=shardings), None, _OK
        except CheckpointMismatchError as err:
            return None, err, _CORRUPT if is_corruption(err) else _MISMATCH
        except Exception as err:  # noqa: BLE001 - classified, then agreed on
            return None, err, _CORRUPT if is_corruption(err) else _FATAL

    def _set_aside(self, step: int, err: Exception, resume_step: int) -> None:
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(self.workdir, CORRUPT_DIR, str(step))
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            while os.path.exists(dst):
                dst += "_"
            os.replace(src, dst)
        log.warning("checkpoint step %d cannot be read (%s); moved it to %s and resuming from "
                    "step %d", step, one_line(err), dst, resume_step)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, *, rng, data_state=None, config: Mapping | None = None,
             tokenizer: Mapping | None = None, extra: Mapping | None = None) -> bool:
        """Write ``state`` (a TrainState with host-fetchable arrays) as checkpoint ``step``;
        ``extra`` (JSON values) is added to its meta."""
        if step in self._manager.all_steps():
            return False
        meta = {
            **dict(extra or {}),
            "step": int(step),
            "state_step": int(state.step),
            "rng": _key_to_json(rng),
            "config": dict(config or {}),
            "tokenizer": dict(tokenizer or {}),
        }
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            meta=ocp.args.JsonSave(meta),
            data=ocp.args.JsonSave({"state": _jsonable(data_state)}),
        )
        return self._manager.save(step, args=args, force=True)

    def restore(self, template_state, step: int | None = None, *,
                config: Mapping | None = None, shardings=None):
        """Restore checkpoint ``step`` (default: latest).

        Args:
          template_state: a TrainState (concrete or abstract) giving the pytree structure.
          step: which checkpoint; None for the latest.
          config: this run's config dict; checked against the saved one first.
          shardings: shardings of ``template_state`` (a matching pytree): every process
            reads only the pieces its devices hold, straight into place (default: all of it
            on this process's first device).

        Returns:
          dict with ``state`` (TrainState), ``rng`` (key), ``data_state`` (iterator state or
          None), ``meta`` (the saved JSON).

        Raises:
          CorruptCheckpointError: files missing, short or undecodable.
          CheckpointMismatchError: the checkpoint does not fit the model or optimizer.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}.")
        meta = read_meta(self.directory, step)
        if config is not None:
            check_compatible(meta.get("config", {}), config, self.workdir)
        abstract = _abstract(template_state, shardings)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract.params),
                    opt_state=ocp.args.StandardRestore(abstract.opt_state),
                    data=ocp.args.JsonRestore(),
                ),
            )
        except Exception as err:
            if is_corruption(err):
                raise CorruptCheckpointError(
                    f"checkpoint step {step} in {self.workdir} is damaged ({one_line(err)})"
                ) from err
            if not isinstance(err, ValueError | KeyError | TypeError):
                raise
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.workdir} does not match the model or optimizer "
                f"of this config ({one_line(err)}); use a fresh --workdir or "
                "the matching config."
            ) from err
        state = template_state.replace(
            step=np.asarray(meta.get("state_step", meta["step"]), np.int32),
            params=restored["params"],
            opt_state=restored["opt_state"],
        )
        return {
            "state": state,
            "rng": _key_from_json(meta["rng"]),
            "data_state": _unjsonable(restored["data"]["state"]),
            "meta": meta,
        }

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
