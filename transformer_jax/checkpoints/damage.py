"""Telling a damaged checkpoint (files missing, short or undecodable) from every other
reason a read can fail (memory, permissions, a storage error that may pass)."""

from __future__ import annotations

import json
import re

__all__ = ["CorruptCheckpointError", "is_corruption"]


class CorruptCheckpointError(ValueError):
    """A checkpoint's files are missing, short or cannot be decoded."""


# tensorstore status codes (``"CODE: message"``) of files that are missing, short or
# undecodable, and of errors that say nothing about the files (storage, permissions, memory)
_DAMAGE_CODES = ("DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE")
_OTHER_CODES = ("UNAVAILABLE", "PERMISSION_DENIED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED",
                "ABORTED", "CANCELLED", "UNAUTHENTICATED")
# what decoders say about short or undecodable data, once names and paths are removed
_DAMAGE_WORDS = re.compile(r"truncated|error decoding|corrupt|checksum", re.IGNORECASE)
_NAMES = re.compile(r"\"[^\"]*\"|'[^']*'|\S*[/\\]\S*")  # quoted names, paths


def _says_damaged(text: str) -> bool:
    """A read error's message (names and paths removed) says the data is damaged."""
    words = _NAMES.sub(" ", text)
    codes = set(re.findall(r"\b[A-Z]+(?:_[A-Z]+)*\b", words))
    if codes & set(_OTHER_CODES):
        return False
    return bool(codes & set(_DAMAGE_CODES)) or bool(_DAMAGE_WORDS.search(words))


def is_corruption(err: BaseException | None) -> bool:
    """Missing, short or undecodable files (not: memory, permissions, other I/O errors).

    Decided by the error's type and tensorstore's status code; the words of a message count
    only with file names and paths removed, so a storage error under a path that contains
    "corrupt" or "checksum" is not damage. Follows the chain of causes: orbax re-raises
    tensorstore's ``ValueError`` as a plain ``Exception`` while handling it.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, CorruptCheckpointError | FileNotFoundError | NotADirectoryError
                      | json.JSONDecodeError | UnicodeDecodeError):
            return True
        if isinstance(err, ValueError) and _says_damaged(str(err)):
            return True
        err = err.__cause__ or err.__context__
    return False
