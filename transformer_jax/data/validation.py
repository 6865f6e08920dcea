"""Reading and checking aligned text files (``{split}.{lang}``, one sentence per line).

Every problem a person can make with parallel text raises :class:`DataError` (a ``ValueError``)
with one sentence naming the file, the line or the counts, and how to fix it:

* a missing directory or file,
* an empty file,
* bytes that are not UTF-8 (``file:line``),
* source and target files with different line counts (both files, both counts).

Windows line ends (CRLF) are normalised silently (logged once per file). Lines are stripped of
surrounding whitespace; pairs where either side is blank are skipped and counted, and the count
is reported through :mod:`warnings` so it shows up once, where the dataset is prepared.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import warnings
from collections.abc import Iterator

__all__ = [
    "DataError",
    "ParallelReport",
    "check_parallel_files",
    "fingerprint_files",
    "iter_parallel_lines",
    "split_files",
]

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Input data that cannot be used as given; the message says what is wrong and how to fix it."""


@dataclasses.dataclass(frozen=True)
class ParallelReport:
    """What :func:`check_parallel_files` found in one pair of aligned files."""

    source_path: str
    target_path: str
    num_lines: int  # lines in each file
    num_pairs: int  # pairs kept (both sides non-blank)
    num_blank_skipped: int  # pairs skipped because one side (or both) was blank
    crlf: bool  # whether either file used Windows line ends


def split_files(path: str, split: str, source_lang: str, target_lang: str) -> tuple[str, str]:
    """Returns ``({path}/{split}.{source_lang}, {path}/{split}.{target_lang})``, checked to exist.

    Raises:
      DataError: the directory or one of the two files is missing.
    """
    if not path:
        raise DataError(
            "data.path is empty; set --config.data.path to a directory holding aligned files "
            f"such as train.{source_lang} and train.{target_lang}."
        )
    if not os.path.isdir(path):
        raise DataError(
            f"Data directory {path!r} does not exist; set data.path to a directory holding "
            f"aligned files named {{split}}.{source_lang} and {{split}}.{target_lang}."
        )
    files = (
        os.path.join(path, f"{split}.{source_lang}"),
        os.path.join(path, f"{split}.{target_lang}"),
    )
    for file in files:
        if not os.path.isfile(file):
            present = sorted(os.listdir(path))[:20]
            raise DataError(
                f"Missing file {file!r}: the {split!r} split needs {split}.{source_lang} and "
                f"{split}.{target_lang} (one sentence per line, aligned); files present in "
                f"{path!r}: {present}."
            )
    return files


def _iter_file_lines(path: str, crlf_seen: list[bool]) -> Iterator[str]:
    """Yields the decoded lines of ``path`` without line ends; raises DataError on bad UTF-8."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
                crlf_seen[0] = True
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{line_no} is not valid UTF-8 (byte {raw[e.start:e.start + 1]!r} at "
                    f"column {e.start + 1}); re-encode the file as UTF-8, e.g. with "
                    f"`iconv -f LATIN1 -t UTF-8`."
                ) from None


def iter_parallel_lines(source_path: str, target_path: str) -> Iterator[tuple[int, str, str]]:
    """Yields ``(line_number, source, target)`` for every pair where both sides are non-blank.

    Lines are stripped; CRLF is treated as LF. Call :func:`check_parallel_files` first: this
    generator assumes the files were checked (it still raises DataError on bad UTF-8 or
    mismatched lengths, but only when it reaches them).
    """
    crlf = [False]
    src_lines = _iter_file_lines(source_path, crlf)
    tgt_lines = _iter_file_lines(target_path, crlf)
    line_no = 0
    for line_no, (src, tgt) in enumerate(zip(src_lines, tgt_lines, strict=False), start=1):
        src, tgt = src.strip(), tgt.strip()
        if src and tgt:
            yield line_no, src, tgt
    # zip stops at the shorter file: make sure neither has lines left.
    for extra in (src_lines, tgt_lines):
        if next(extra, None) is not None:
            raise DataError(
                f"{source_path} and {target_path} have different line counts (they differ after "
                f"line {line_no}); every line must be the translation of the same line in the "
                "other file."
            )


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        data_end = b""
        count = 0
        for chunk in iter(lambda: f.read(1 << 20), b""):
            count += chunk.count(b"\n")
            data_end = chunk
    # A last line without a trailing newline still counts.
    return count + (1 if data_end and not data_end.endswith(b"\n") else 0)


def check_parallel_files(source_path: str, target_path: str) -> ParallelReport:
    """Checks one pair of aligned files and counts what will be kept.

    Raises:
      DataError: a file is empty, has invalid UTF-8, the line counts differ, or no pair is left
        after skipping blank lines.
    """
    for path in (source_path, target_path):
        if os.path.getsize(path) == 0:
            raise DataError(
                f"{path} is empty; it must hold one sentence per line, aligned line by line with "
                f"{target_path if path == source_path else source_path}."
            )
    n_src, n_tgt = _count_lines(source_path), _count_lines(target_path)
    if n_src != n_tgt:
        raise DataError(
            f"{source_path} has {n_src} lines but {target_path} has {n_tgt}; aligned files need "
            "the same number of lines (line i of one is the translation of line i of the other)."
        )
    crlf = [False]
    kept = blank = 0
    src_lines = _iter_file_lines(source_path, crlf)
    tgt_lines = _iter_file_lines(target_path, crlf)
    for src, tgt in zip(src_lines, tgt_lines, strict=True):
        if src.strip() and tgt.strip():
            kept += 1
        else:
            blank += 1
    if crlf[0]:
        log.info("%s / %s use Windows line ends (CRLF); treating them as LF.",
                 source_path, target_path)
    if kept == 0:
        raise DataError(
            f"{source_path} and {target_path} have no pair of non-blank lines; put one sentence "
            "per line in each file."
        )
    if blank:
        warnings.warn(
            f"Skipped {blank} of {n_src} line pairs in {source_path} / {target_path} because "
            "the source or target line is blank.",
            stacklevel=2,
        )
    return ParallelReport(source_path, target_path, n_src, kept, blank, crlf[0])


def fingerprint_files(paths: list[str], extra: str = "") -> str:
    """Hex SHA-256 of the contents of ``paths`` (in order) and ``extra``."""
    digest = hashlib.sha256(extra.encode())
    for path in paths:
        digest.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()
