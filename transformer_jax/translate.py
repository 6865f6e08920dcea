"""Translate text with a trained model: one line in, one line out.

  python -m transformer_jax.translate --workdir runs/demo < input.txt > output.txt
  python -m transformer_jax.translate --workdir runs/demo --beam 4 --alpha 0.6 \\
      --reference ref.txt < input.txt > output.txt          # scores on stderr

Beam search with 4 beams by default; the length penalty defaults to the run's own
``eval_length_penalty`` (the one its evaluation used; 0.6, the paper's, for runs without one).

Lines keep their order and count; empty lines give empty lines. Input is read as UTF-8
bytes and decoded line by line, so a bad line is reported by number. Exit status: 0 on
success, 1 for unusable input (bad UTF-8, reference line count), 2 for a missing work
directory / checkpoint / tokenizer or bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys

from transformer_jax.runtime import configure_malloc, skip_absent_tpu

if __name__ == "__main__":
    configure_malloc()  # re-executes once, before JAX is imported (transformer_jax/runtime.py)
    skip_absent_tpu()  # libtpu installed but no TPU here: no probe, no libtpu error

import absl.logging

from transformer_jax.data.validation import DataError
from transformer_jax.errors import CheckpointMismatchError
from transformer_jax.inference import Translator, corpus_scores

__all__ = ["main", "read_lines"]


class InputError(ValueError):
    """Input text that cannot be used (reported as one line, exit status 1)."""


def read_lines(data: bytes, what: str = "the input") -> list[str]:
    """Split UTF-8 ``data`` into lines (``\\n`` or ``\\r\\n``; no empty last line).

    Raises:
      InputError: naming the first line (1-based) that is not valid UTF-8.
    """
    raw = data.split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()
    lines = []
    for number, line in enumerate(raw, start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(
                f"line {number} of {what} is not valid UTF-8 (byte 0x{line[err.start]:02x} at "
                f"column {err.start + 1}); convert it to UTF-8, e.g. with iconv -t UTF-8."
            ) from None
        lines.append(text[:-1] if text.endswith("\r") else text)
    return lines


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m transformer_jax.translate",
        description="Translate stdin to stdout, one line per line, with a trained model.")
    parser.add_argument("--workdir", required=True, help="training work directory")
    parser.add_argument("--beam", type=int, default=4, help="beam size (1: greedy search)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="beam length penalty (default: the run's eval_length_penalty)")
    parser.add_argument("--batch_size", type=int, default=64, help="sentences per batch")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
    parser.add_argument("--averaged", action="store_true",
                        help="use the averaged checkpoint in <workdir>/averaged")
    parser.add_argument("--reference", default=None,
                        help="reference translations, one per input line: print BLEU, chrF "
                             "and exact match to stderr")
    parser.add_argument("--input", default="-", help="input file (default: stdin)")
    return parser


def _read(path: str, what: str) -> list[str]:
    if path == "-":
        return read_lines(sys.stdin.buffer.read(), what)
    try:
        with open(path, "rb") as f:
            return read_lines(f.read(), what)
    except OSError as err:
        raise FileNotFoundError(f"cannot read {what} {path}: {err.strerror}.") from None


def _quiet_logs() -> None:
    absl.logging.set_verbosity(absl.logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.beam < 1 or args.batch_size < 1:
        print(f"error: --beam={args.beam} and --batch_size={args.batch_size} must be >= 1.",
              file=sys.stderr)
        return 2
    if args.alpha is not None and not math.isfinite(args.alpha):
        print(f"error: --alpha={args.alpha} is not a finite number; give a finite length "
              "penalty such as 0.6.", file=sys.stderr)
        return 2
    try:
        lines = _read(args.input, "the input")
        refs = None
        if args.reference is not None:
            refs = _read(args.reference, "--reference")
            if len(refs) != len(lines):
                raise InputError(
                    f"--reference {args.reference} has {len(refs)} lines but the input has "
                    f"{len(lines)}; give one reference per input line."
                )
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    _quiet_logs()
    try:
        translator = Translator.from_workdir(args.workdir, step=args.step,
                                             averaged=args.averaged)
    except (FileNotFoundError, ValueError, DataError, CheckpointMismatchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    alpha = translator.length_penalty if args.alpha is None else args.alpha
    outputs = translator.translate(lines, beam_size=args.beam, alpha=alpha,
                                   batch_size=args.batch_size)
    sys.stdout.buffer.write("".join(f"{text}\n" for text in outputs).encode("utf-8"))
    sys.stdout.flush()
    if refs is not None:
        scores = corpus_scores(outputs, refs)
        parts = "  ".join(f"{name} {scores.get(name, 0.0):.4f}"
                          for name in ("bleu", "chrf", "exact_match"))
        print(f"{parts}  ({len(lines)} lines, step {translator.step})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
