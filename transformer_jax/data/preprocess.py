"""Text preprocessing applied identically when training and when translating.

Configured by ``data.*`` keys (see ``data/config.py``) and recorded with them in the work
directory's ``config.json``, so ``python -m transformer_jax.translate`` applies to its input
exactly what the training data went through:

* ``data.unicode_normalization``: ``"NFKC"`` (or ``"NFC"``/``"NFKD"``/``"NFD"``) — one code
  point sequence for one glyph (full-width letters, ligatures, composed accents);
* ``data.normalize_punctuation``: Moses' punctuation normalisation (``sacremoses``): curly and
  language-specific quotes, dashes, ellipses and odd spacing around punctuation become one form;
* ``data.lowercase``: lower-case both sides (results on Multi30k are often reported lowercased;
  the model then also *writes* lowercase, so cased BLEU drops);
* ``data.max_length_ratio``: training pairs whose token counts differ by more than this factor
  are dropped (misaligned lines in noisy corpora); 0 turns the filter off. Evaluation and test
  pairs are never dropped.

Order: Unicode normalisation, punctuation, lowercasing — each step sees the previous one's
output, and lowercasing last also folds letters that NFKC produced.
"""

from __future__ import annotations

import dataclasses
import functools
import unicodedata
from collections.abc import Callable, Mapping

from transformer_jax.data.numbers import source_normalizer

__all__ = ["UNICODE_FORMS", "Preprocessor", "source_transform"]

UNICODE_FORMS = ("", "NFC", "NFKC", "NFD", "NFKD")


@functools.lru_cache(maxsize=8)
def _punct_normalizer(lang: str):
    from sacremoses import MosesPunctNormalizer  # ~1 s to import: only runs that use it

    return MosesPunctNormalizer(lang=lang or "en")


@dataclasses.dataclass(frozen=True)
class Preprocessor:
    """What happens to a sentence before tokenization; the identity with default fields.

    Attributes:
      lowercase: lower-case the text (``str.lower``).
      unicode_normalization: one of ``UNICODE_FORMS`` ("" = leave as is).
      normalize_punctuation: apply Moses punctuation normalisation.
      max_length_ratio: drop training pairs whose longer side has more than this many times
        the tokens of the shorter side (0 = keep all).
      source_lang / target_lang: language codes, for language-specific punctuation rules.
    """

    lowercase: bool = False
    unicode_normalization: str = ""
    normalize_punctuation: bool = False
    max_length_ratio: float = 0.0
    source_lang: str = "en"
    target_lang: str = "de"

    def __post_init__(self):
        if self.unicode_normalization not in UNICODE_FORMS:
            raise ValueError(
                f"data.unicode_normalization={self.unicode_normalization!r} must be one of "
                f"{UNICODE_FORMS} (\"\" leaves the text as is)."
            )
        if self.max_length_ratio != 0 and not self.max_length_ratio >= 1:
            raise ValueError(
                f"data.max_length_ratio={self.max_length_ratio} must be 0 (off) or >= 1, e.g. "
                "2.5 drops pairs where one side has 2.5x the tokens of the other."
            )

    @classmethod
    def from_config(cls, data_config: Mapping) -> Preprocessor:
        """The preprocessor described by a ``data.*`` config (ConfigDict or dict).

        Keys absent from ``data_config`` (work directories written before these options
        existed) keep their identity defaults.
        """
        get = data_config.get
        return cls(
            lowercase=bool(get("lowercase", False)),
            unicode_normalization=str(get("unicode_normalization", "") or ""),
            normalize_punctuation=bool(get("normalize_punctuation", False)),
            max_length_ratio=float(get("max_length_ratio", 0.0) or 0.0),
            source_lang=str(get("source_lang", "en")),
            target_lang=str(get("target_lang", "de")),
        )

    @property
    def is_identity(self) -> bool:
        """True when no text is changed (the length-ratio filter is not a text change)."""
        return not (self.lowercase or self.unicode_normalization or self.normalize_punctuation)

    def _apply(self, text: str, lang: str) -> str:
        if self.unicode_normalization:
            text = unicodedata.normalize(self.unicode_normalization, text)
        if self.normalize_punctuation:
            text = _punct_normalizer(lang).normalize(text)
        if self.lowercase:
            text = text.lower()
        return text

    def source(self, text: str) -> str:
        """A source sentence as the model sees it (training and translation alike)."""
        return self._apply(text, self.source_lang)

    def target(self, text: str) -> str:
        """A target sentence as the model learns it (and references as they are scored)."""
        return self._apply(text, self.target_lang)

    def keep(self, source_tokens: int, target_tokens: int) -> bool:
        """Whether a training pair passes the length-ratio filter (token counts, EOS excluded)."""
        if not self.max_length_ratio:
            return True
        short, long = sorted((max(source_tokens, 1), max(target_tokens, 1)))
        return long <= self.max_length_ratio * short


def source_transform(data_config: Mapping) -> Callable[[str], str] | None:
    """What a typed source sentence goes through before tokenizing, for a run's ``data.*``.

    The preprocessing the training pairs went through (:class:`Preprocessor`), then, for the
    built-in numbers task, the spelling normaliser that maps "Three hundred and five" to the
    training spelling "three hundred five" (``data/numbers.py``). None when both are the
    identity. ``Translator.from_workdir`` applies it to every input line.
    """
    steps = []
    preprocessor = Preprocessor.from_config(data_config)
    if not preprocessor.is_identity:
        steps.append(preprocessor.source)
    numbers = source_normalizer(data_config)
    if numbers is not None:
        steps.append(numbers)
    if not steps:
        return None
    if len(steps) == 1:
        return steps[0]
    return lambda text: steps[1](steps[0](text))
