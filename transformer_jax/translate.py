"""Translate text with a trained model: one line in, one line out.

  python -m transformer_jax.translate --workdir runs/demo < input.txt > output.txt
  python -m transformer_jax.translate --workdir runs/demo --beam 4 --alpha 0.6 \\
      --reference ref.txt < input.txt > output.txt          # scores on stderr
  python -m transformer_jax.translate --workdir runs/demo --quantize int8 < input.txt

Beam search with 4 beams by default; the length penalty defaults to the run's own
``eval_length_penalty`` (the one its evaluation used; 0.6, the paper's, for runs without one).

Lines keep their order and count; empty lines give empty lines. Input is read as UTF-8
bytes and decoded line by line, so a bad line is reported by number. Exit status: 0 on
success, 1 for unusable input (bad UTF-8, reference line count), 2 for a missing work
directory / checkpoint / tokenizer or bad arguments.

Long inputs stream: the input is read ``--chunk_size`` lines at a time; each chunk is sorted
by length into batches (``Translator.translate``) and its outputs are written, in input
order, as soon as it is done (a bad UTF-8 line stops the run after the chunks before it were
written). With ``--reference`` the whole input is read first (scores need every line).
Progress goes to stderr when the input is a file or a pipe (not a terminal).

Compiled programs are kept in a persistent JAX compilation cache (``--compile_cache``,
default ``~/.cache/transformer_jax/jax``; ``none`` turns it off), so a second run skips
compilation, and the translate programs themselves are exported to its ``programs/`` folder
(``inference.exported``), so a second run skips tracing and lowering them too.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Iterator

from transformer_jax.runtime import configure_malloc, skip_absent_tpu

if __name__ == "__main__":
    configure_malloc()  # re-executes once, before JAX is imported (transformer_jax/runtime.py)
    skip_absent_tpu()  # libtpu installed but no TPU here: no probe, no libtpu error

import absl.logging

from transformer_jax.data.validation import DataError
from transformer_jax.errors import CheckpointMismatchError
from transformer_jax.inference import Translator
from transformer_jax.inference.exported import ProgramStore

__all__ = ["iter_chunks", "main", "read_lines"]

DEFAULT_CACHE = os.path.join("~", ".cache", "transformer_jax", "jax")
PROGRAMS_DIR = "programs"  # exported translate programs, inside the compilation cache


class InputError(ValueError):
    """Input text that cannot be used (reported as one line, exit status 1)."""


def _decode_line(line: bytes, number: int, what: str) -> str:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(
            f"line {number} of {what} is not valid UTF-8 (byte 0x{line[err.start]:02x} at "
            f"column {err.start + 1}); convert it to UTF-8, e.g. with iconv -t UTF-8."
        ) from None
    return text[:-1] if text.endswith("\r") else text


def read_lines(data: bytes, what: str = "the input") -> list[str]:
    """Split UTF-8 ``data`` into lines (``\\n`` or ``\\r\\n``; no empty last line).

    Raises:
      InputError: naming the first line (1-based) that is not valid UTF-8.
    """
    raw = data.split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()
    return [_decode_line(line, number, what) for number, line in enumerate(raw, start=1)]


def iter_chunks(stream, size: int, what: str = "the input") -> Iterator[list[str]]:
    """Lines of a binary ``stream``, ``size`` at a time (the last chunk may be shorter), as
    :func:`read_lines` splits them; a chunk is decoded whole before it is yielded.

    Raises:
      InputError: naming the first line (1-based) that is not valid UTF-8.
    """
    chunk, number = [], 0
    for line in stream:
        number += 1
        chunk.append(_decode_line(line[:-1] if line.endswith(b"\n") else line, number, what))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


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
    parser.add_argument("--chunk_size", type=int, default=1024,
                        help="lines read, sorted, translated and written at a time")
    parser.add_argument("--quantize", default="none",
                        help="'int8': decode with int8 weights (docs/decoding.md, 'int8'); "
                             "'none' (default): the weights as trained")
    parser.add_argument("--compile_cache", default=DEFAULT_CACHE,
                        help="persistent JAX compilation cache directory ('none': off)")
    return parser


def _read(path: str, what: str) -> list[str]:
    if path == "-":
        return read_lines(sys.stdin.buffer.read(), what)
    try:
        with open(path, "rb") as f:
            return read_lines(f.read(), what)
    except OSError as err:
        raise FileNotFoundError(f"cannot read {what} {path}: {err.strerror}.") from None


def _open_input(args) -> tuple[Iterator[list[str]], list[str] | None, int | None]:
    """``(chunks of input lines, reference lines or None, line count when known)``.

    With ``--reference`` the whole input is read and checked against it first."""
    if args.reference is not None:
        lines = _read(args.input, "the input")
        refs = _read(args.reference, "--reference")
        if len(refs) != len(lines):
            raise InputError(
                f"--reference {args.reference} has {len(refs)} lines but the input has "
                f"{len(lines)}; give one reference per input line."
            )
        return iter([lines] if lines else []), refs, len(lines)
    if args.input == "-":
        return iter_chunks(sys.stdin.buffer, args.chunk_size), None, None
    try:
        stream = open(args.input, "rb")  # noqa: SIM115 (read lazily, closed at exit)
        total = sum(block.count(b"\n") for block in iter(lambda: stream.read(1 << 20), b""))
        stream.seek(0)
    except OSError as err:
        raise FileNotFoundError(f"cannot read the input {args.input}: {err.strerror}.") from None
    return iter_chunks(stream, args.chunk_size), None, total


def _enable_compile_cache(path: str) -> str | None:
    """Persistent JAX compilation cache in ``path`` (every program, however fast it compiled);
    returns the folder, or None when there is none."""
    if path.lower() == "none":
        return None
    import jax

    path = os.path.expanduser(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        print(f"warning: no compilation cache ({path}: {err.strerror}).", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def _quiet_logs() -> None:
    absl.logging.set_verbosity(absl.logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)


def _translate_stream(translator, chunks, args, total: int | None) -> list[str]:
    """Translates and writes chunk by chunk (flushed); returns every output."""
    from tqdm import tqdm

    alpha = translator.length_penalty if args.alpha is None else args.alpha
    show = args.input != "-" or not sys.stdin.isatty()
    outputs, bar = [], None
    for lines in chunks:  # decoding a chunk raises InputError before any of it is written
        if bar is None:
            bar = tqdm(total=total, unit=" lines", file=sys.stderr, disable=not show,
                       dynamic_ncols=True)
        done = translator.translate(lines, beam_size=args.beam, alpha=alpha,
                                    batch_size=args.batch_size)
        sys.stdout.buffer.write("".join(f"{text}\n" for text in done).encode("utf-8"))
        sys.stdout.flush()
        outputs += done
        bar.update(len(lines))
    if bar is not None:
        bar.close()
    return outputs


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if min(args.beam, args.batch_size, args.chunk_size) < 1:
        print(f"error: --beam={args.beam}, --batch_size={args.batch_size} and "
              f"--chunk_size={args.chunk_size} must be >= 1.", file=sys.stderr)
        return 2
    if args.quantize not in ("none", "int8"):
        print(f"error: --quantize={args.quantize} is not supported; use int8 or none.",
              file=sys.stderr)
        return 2
    if args.alpha is not None and not math.isfinite(args.alpha):
        print(f"error: --alpha={args.alpha} is not a finite number; give a finite length "
              "penalty such as 0.6.", file=sys.stderr)
        return 2
    try:
        chunks, refs, total = _open_input(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    _quiet_logs()
    cache = _enable_compile_cache(args.compile_cache)
    store = None if cache is None else ProgramStore(os.path.join(cache, PROGRAMS_DIR))
    try:
        translator = Translator.from_workdir(
            args.workdir, step=args.step, averaged=args.averaged,
            quantize=None if args.quantize == "none" else args.quantize, program_store=store)
    except (FileNotFoundError, ValueError, DataError, CheckpointMismatchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        outputs = _translate_stream(translator, chunks, args, total)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if refs is not None:
        from transformer_jax.metrics import corpus_scores  # sacrebleu: only when scoring

        scores = corpus_scores(outputs, refs)
        parts = "  ".join(f"{name} {scores.get(name, 0.0):.4f}"
                          for name in ("bleu", "chrf", "exact_match"))
        print(f"{parts}  ({len(outputs)} lines, step {translator.step})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
