"""Corpus scores of aligned hypothesis / reference lists: sacreBLEU BLEU and chrF, exact match.

Never hand-written: every score is sacrebleu's. Used by evaluation during training, by the
translate command's ``--reference`` and by research code; ``transformer_jax.inference``
re-exports the three functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import sacrebleu

__all__ = ["bleu", "chrf", "corpus_scores"]


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
