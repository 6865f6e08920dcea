"""Joint SentencePiece tokenizer: pad=0, eos=1, unk=2, no BOS.

One model covers source and target (the embedding can be shared). Training is deterministic:
the caller passes the sentences in a fixed order, SentencePiece neither samples nor shuffles
them (``input_sentence_size=0``, ``shuffle_input_sentence=False``) and runs a fixed number of
threads, so the same sentences give byte-identical models. Models are written atomically
(temporary file + rename): a crash never leaves a half-written ``spm.model`` behind.

Subword regularisation (Kudo, 2018) for training: :meth:`Tokenizer.encode_sampled` segments
each string by one of its ``nbest_size`` most probable segmentations under the unigram model,
drawn with probability proportional to ``P(segmentation) ** alpha``. The draw is a function of
``(seed, key)`` alone, so a resumed or re-sharded run reads the same segmentations.
"""

from __future__ import annotations

import functools
import io
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from transformer_jax.data.files import write_atomically
from transformer_jax.data.validation import DataError

__all__ = ["PAD_ID", "EOS_ID", "UNK_ID", "TOKENIZER_FILE", "Tokenizer"]

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
TOKENIZER_FILE = os.path.join("tokenizer", "spm.model")  # in a work directory
_TRAIN_THREADS = 16  # fixed (not os.cpu_count()): the thread split changes the learned model.
_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\).*?<= (\d+)")


class Tokenizer:
    """A loaded SentencePiece model with batch ``encode`` / ``decode``.

    ``encode`` returns ids without EOS (the pipeline appends it); ``decode`` stops at the first
    EOS and drops padding, so model outputs ``[B, T]`` can be decoded as they are.
    """

    pad_id, eos_id, unk_id = PAD_ID, EOS_ID, UNK_ID

    def __init__(self, model_proto: bytes):
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        ids = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id(), self._sp.bos_id())
        if ids != (PAD_ID, EOS_ID, UNK_ID, -1):
            raise DataError(
                f"SentencePiece model has pad/eos/unk/bos ids {ids}, expected (0, 1, 2, -1); "
                "train it with Tokenizer.train or delete it so it is trained again."
            )

    # Pickling keeps only the model bytes (grain worker processes rebuild the processor).
    def __getstate__(self):
        return {"proto": self._proto}

    def __setstate__(self, state):
        self.__init__(state["proto"])

    @classmethod
    def train(
        cls,
        sentences: Iterable[str],
        *,
        vocab_size: int,
        model_type: str = "unigram",
        character_coverage: float = 1.0,
        path: str | None = None,
    ) -> Tokenizer:
        """Trains a model on ``sentences`` (in the given order) and saves it at ``path`` if given.

        Raises:
          DataError: the corpus is too small for ``vocab_size`` (with the largest size that works).
        """
        if model_type not in ("unigram", "bpe"):
            raise DataError(f"tokenizer model_type={model_type!r} must be 'unigram' or 'bpe'.")
        buffer = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_writer=buffer,
                vocab_size=vocab_size,
                model_type=model_type,
                pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
                character_coverage=character_coverage,
                input_sentence_size=0,
                shuffle_input_sentence=False,
                num_threads=_TRAIN_THREADS,
                hard_vocab_limit=True,
                minloglevel=2,
            )
        except RuntimeError as e:
            match = _TOO_HIGH.search(str(e))
            if match:
                raise DataError(
                    f"data.vocab_size={vocab_size} is too large for this training text "
                    f"(SentencePiece can make at most {match.group(2)} pieces from it); set "
                    f"--config.data.vocab_size to {match.group(2)} or less."
                ) from None
            raise DataError(f"SentencePiece training failed: {e}") from e
        tokenizer = cls(buffer.getvalue())
        if path is not None:
            tokenizer.save(path)
        return tokenizer

    @classmethod
    def load(cls, path: str) -> Tokenizer:
        """Loads a model written by :meth:`save`."""
        if not os.path.isfile(path):
            raise DataError(f"No tokenizer model at {path!r}; train one with Tokenizer.train.")
        with open(path, "rb") as f:
            return cls(f.read())

    def save(self, path: str) -> None:
        """Writes the model bytes to ``path`` atomically."""
        write_atomically(path, self._proto)

    @functools.cached_property
    def _log_probs(self) -> np.ndarray:
        """log P(piece) of every piece (a segmentation's log probability is their sum); built
        on first use, so only training with subword sampling pays for it."""
        return np.array([self._sp.get_score(i) for i in range(self.vocab_size)])

    @property
    def model_proto(self) -> bytes:
        return self._proto

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def id_to_piece(self, index: int) -> str:
        return self._sp.id_to_piece(int(index))

    def encode_one(self, text: str) -> list[int]:
        """Ids of one string (no EOS)."""
        return self._sp.encode(text)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each string (no EOS): ``list[str]`` -> ``list[list[int]]``."""
        if isinstance(texts, str):
            raise TypeError("Tokenizer.encode takes a list of strings; wrap a single one in [].")
        return self._sp.encode(list(texts))

    def encode_sampled(self, texts: Sequence[str], keys: Sequence[int], *, alpha: float,
                       nbest_size: int, seed: int) -> list[list[int]]:
        """Ids of each string (no EOS), segmented by a sample from its n best segmentations.

        Segmentation ``j`` of ``texts[i]`` is drawn with probability proportional to
        ``P_j ** alpha`` among the ``nbest_size`` most probable ones (``alpha`` -> 0: uniform;
        large ``alpha``: the best one, as :meth:`encode`). The draw depends only on
        ``(seed, keys[i])`` (non-negative ints): give each string and epoch its own key.
        Unigram models only (SentencePiece has no n-best list for BPE).
        """
        if isinstance(texts, str):
            raise TypeError("Tokenizer.encode_sampled takes a list of strings.")
        try:
            candidates = self._sp.nbest_encode_as_ids(list(texts), nbest_size=nbest_size)
        except RuntimeError as e:
            raise DataError(
                f"subword sampling needs a unigram tokenizer ({e}); set "
                "data.tokenizer_model_type='unigram' or data.subword_sampling_alpha=0."
            ) from None
        out = []
        for segmentations, key in zip(candidates, keys, strict=True):
            if len(segmentations) == 1:
                out.append(segmentations[0])
                continue
            log_p = alpha * np.array([self._log_probs[ids].sum() for ids in segmentations])
            cdf = np.cumsum(np.exp(log_p - log_p.max()))
            u = np.random.default_rng((seed, key)).random() * cdf[-1]
            out.append(segmentations[min(int(np.searchsorted(cdf, u, side="right")),
                                         len(segmentations) - 1)])
        return out

    def decode(self, ids) -> list[str]:
        """Text of each row of ``ids`` (``[B, T]`` array or list of lists).

        Each row is cut at its first EOS; padding (0) is dropped wherever it appears.
        """
        if isinstance(ids, list | tuple):
            rows = [[int(i) for i in row] for row in ids]
        else:  # numpy or jax array
            rows = np.asarray(ids).reshape(len(ids), -1).tolist()
        out = []
        for row in rows:
            if EOS_ID in row:
                row = row[: row.index(EOS_ID)]
            out.append(self._sp.decode([i for i in row if i != PAD_ID]))
        return out
