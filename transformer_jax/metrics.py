"""Corpus scores of aligned hypothesis / reference lists: sacreBLEU BLEU and chrF, exact match
(overall, and by the magnitude of a number each example carries).

Never hand-written: every score is sacrebleu's. Used by evaluation during training, by the
translate command's ``--reference`` and by research code; ``transformer_jax.inference``
re-exports the three functions.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import sacrebleu

__all__ = ["MAGNITUDES", "bleu", "chrf", "corpus_scores", "exact_match_by_magnitude"]

# Magnitude buckets of exact_match_by_magnitude: (label, smallest |value|), ascending; a value
# belongs to the last bucket whose lower end it reaches. Labels use only characters that
# TensorBoard keeps in a tag.
MAGNITUDES = (("0-9", 0), ("10-99", 10), ("100-999", 100), ("1000-9999", 1_000),
              ("10000-up", 10_000))


def _check_aligned(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} references; they must align "
            "line by line."
        )


def bleu(hypotheses: Sequence[str], references: Sequence[str], *, lowercase: bool = False,
         tokenize: str = "13a") -> float:
    """sacrebleu corpus BLEU (0-100) of aligned hypothesis/reference lists (one reference)."""
    _check_aligned(hypotheses, references)
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)],
                                       lowercase=lowercase, tokenize=tokenize).score)


def chrf(hypotheses: Sequence[str], references: Sequence[str], *, word_order: int = 0) -> float:
    """sacrebleu corpus chrF (0-100; ``word_order=2`` gives chrF++)."""
    _check_aligned(hypotheses, references)
    return float(sacrebleu.corpus_chrf(list(hypotheses), [list(references)],
                                       word_order=word_order).score)


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str],
                  names=("bleu", "chrf", "exact_match")) -> dict[str, float]:
    """sacrebleu corpus BLEU / chrF and exact-match rate (all 0-100) of aligned lists.

    ``names`` picks a subset of ("bleu", "chrf", "exact_match"); exact match compares
    stripped strings. Empty lists give an empty dict.
    """
    _check_aligned(hypotheses, references)
    out: dict[str, float] = {}
    if not hypotheses:
        return out
    if "bleu" in names:
        out["bleu"] = bleu(hypotheses, references)
    if "chrf" in names:
        out["chrf"] = chrf(hypotheses, references)
    if "exact_match" in names:
        same = sum(h.strip() == r.strip() for h, r in zip(hypotheses, references, strict=True))
        out["exact_match"] = 100.0 * same / len(hypotheses)
    return out


def exact_match_by_magnitude(hypotheses: Sequence[str], references: Sequence[str],
                             values: Sequence[int]) -> dict[str, float]:
    """Exact-match rate (0-100) per magnitude bucket of ``values`` (one number per example,
    e.g. the number a sentence spells out), as ``{"exact_match_<label>": rate}`` for the
    buckets of ``MAGNITUDES`` that hold at least one example, smallest first.
    """
    _check_aligned(hypotheses, references)
    if len(values) != len(hypotheses):
        raise ValueError(f"{len(values)} values but {len(hypotheses)} hypotheses; give one "
                         "value per example.")
    lows = [low for _, low in MAGNITUDES]
    total = [0] * len(MAGNITUDES)
    right = [0] * len(MAGNITUDES)
    for hyp, ref, value in zip(hypotheses, references, values, strict=True):
        bucket = bisect.bisect_right(lows, abs(int(value))) - 1
        total[bucket] += 1
        right[bucket] += hyp.strip() == ref.strip()
    return {f"exact_match_{label}": 100.0 * right[b] / total[b]
            for b, (label, _) in enumerate(MAGNITUDES) if total[b]}
