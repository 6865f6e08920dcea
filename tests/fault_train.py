"""``train.py`` with one fault injected on one process (run by tests/e2e/test_multihost.py).

usage: python fault_train.py FAULT PROCESS UPDATE [train.py flags...]

FAULT ``data``: on process PROCESS the training data's prefetch thread raises ``ValueError``
while it lays out the batch of update UPDATE (as an undecodable record would);
``history``: process PROCESS (the chief: only it writes the history) fails to append update
UPDATE's training metrics to ``history.jsonl`` with ``OSError(ENOSPC)`` (a full disk).
The faults are patched in from here; the package has no fault switches.
"""

import errno
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
SCRIPT = os.path.abspath(__file__)
MESSAGES = {"data": "training record 17 cannot be decoded (injected fault)",
            "history": "No space left on device (injected fault)"}


def inject(fault: str, process: int, update: int, me: int) -> None:
    if me != process:
        return
    if fault == "data":
        from transformer_jax.data import streams

        layout, calls = streams.layout_rows, []

        def failing_layout(*args, **kwargs):  # once per batch, in the prefetch thread
            calls.append(1)
            if len(calls) == update:
                raise ValueError(MESSAGES[fault])
            return layout(*args, **kwargs)

        streams.layout_rows = failing_layout
    elif fault == "history":
        from transformer_jax.training import reporting

        add = reporting.History.add

        def failing_add(self, step, split, metrics):
            if split == "train" and step == update:
                raise OSError(errno.ENOSPC, MESSAGES[fault], self.path)
            return add(self, step, split, metrics)

        reporting.History.add = failing_add
    else:
        raise SystemExit(f"unknown fault {fault!r}; choose one of {', '.join(MESSAGES)}.")


if __name__ == "__main__":
    from transformer_jax.runtime import configure_malloc

    configure_malloc()  # re-executes this script once, as train.py would re-execute itself
    fault, process, update = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    del sys.argv[1:4]
    me = next(int(arg.split("=", 1)[1]) for arg in sys.argv
              if arg.startswith("--config.distributed.process_id="))
    inject(fault, process, update, me)
    sys.argv[0] = TRAIN
    runpy.run_path(TRAIN, run_name="__main__")
