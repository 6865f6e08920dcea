"""Telling a damaged checkpoint (files missing, short or undecodable) from every other
reason a read can fail (memory, permissions, a storage error that may pass)."""

from __future__ import annotations

import json

__all__ = ["CorruptCheckpointError", "is_corruption"]


class CorruptCheckpointError(ValueError):
    """A checkpoint's files are missing, short or cannot be decoded."""


# tensorstore status codes and messages of files that are missing, short or undecodable
_DAMAGE_MARKS = ("DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE", "Truncated", "truncated",
                 "Error decoding", "corrupt", "checksum")


def is_corruption(err: BaseException | None) -> bool:
    """Missing, short or undecodable files (not: memory, permissions, other I/O errors).

    Follows the chain of causes: orbax re-raises tensorstore's ``ValueError`` as a plain
    ``Exception`` while handling it.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, CorruptCheckpointError | FileNotFoundError | NotADirectoryError
                      | json.JSONDecodeError | UnicodeDecodeError):
            return True
        if isinstance(err, ValueError) and any(m in str(err) for m in _DAMAGE_MARKS):
            return True
        err = err.__cause__ or err.__context__
    return False
