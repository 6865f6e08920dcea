"""Marian's tokenizer: two SentencePiece models (source, target) and one ``vocab.json``.

``MarianTokenizer`` gives the ids of transformers' ``MarianTokenizer``: the text (after a
leading language code such as ``>>fr<<``, which is one token) is split into pieces by the
*source* SentencePiece model (the *target* one for ``encode_target``), and each piece is
looked up in ``vocab.json`` (``<unk>`` when absent). Its ids are the model's, e.g. for
OPUS-MT ``</s>`` = 0, ``<unk>`` = 1 and ``<pad>`` = V - 1.

For work directories, :meth:`MarianTokenizer.joint_model_proto` writes one SentencePiece model
in this library's id convention (pad 0, eos 1, unk 2) whose pieces are ``vocab.json``'s in a
given order, so the existing ``data.Tokenizer`` (training, ``translate``) reads it unchanged.
It segments text with the source model's pieces and scores; pieces only the target model has
are kept for decoding but never produced by encoding (SentencePiece type UNUSED).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as spm_pb2

__all__ = ["MarianTokenizer", "TokenizerFilesError"]

_Piece = spm_pb2.ModelProto.SentencePiece
FILES = ("source.spm", "target.spm", "vocab.json")


class TokenizerFilesError(ValueError):
    """Missing or unusable Marian tokenizer files (one sentence)."""


def _language_code(text: str) -> tuple[list[str], str]:
    """``">>fr<< text"`` -> ``([">>fr<<"], " text")`` (as transformers' MarianTokenizer)."""
    if text.startswith(">>"):
        end = text.find("<<")
        if end != -1:
            return [text[: end + 2]], text[end + 2:]
    return [], text


class MarianTokenizer:
    """Marian SentencePiece tokenizer with ``data.Tokenizer``'s interface (model ids).

    Args:
      source_proto, target_proto: bytes of ``source.spm`` / ``target.spm``.
      vocab: ``vocab.json`` (piece -> id), shared by source and target.
      unk, eos, pad: the special pieces.
    """

    def __init__(self, source_proto: bytes, target_proto: bytes, vocab: Mapping[str, int], *,
                 unk: str = "<unk>", eos: str = "</s>", pad: str = "<pad>"):
        self.source_proto, self.target_proto = bytes(source_proto), bytes(target_proto)
        self._source = spm.SentencePieceProcessor(model_proto=self.source_proto)
        self._target = spm.SentencePieceProcessor(model_proto=self.target_proto)
        self.vocab = {str(k): int(v) for k, v in vocab.items()}
        for piece in (unk, eos, pad):
            if piece not in self.vocab:
                raise TokenizerFilesError(f"vocab.json has no {piece!r} entry; it must have one.")
        ids = sorted(self.vocab.values())
        if ids != list(range(len(ids))):
            raise TokenizerFilesError("vocab.json ids must be 0 .. V-1, each used once.")
        self.pieces = [""] * len(ids)
        for piece, index in self.vocab.items():
            self.pieces[index] = piece
        self.unk_id, self.eos_id, self.pad_id = self.vocab[unk], self.vocab[eos], self.vocab[pad]

    @classmethod
    def from_directory(cls, path: str) -> MarianTokenizer:
        """Reads ``source.spm``, ``target.spm`` and ``vocab.json`` of a Marian directory."""
        missing = [f for f in FILES if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise TokenizerFilesError(
                f"{path} lacks the tokenizer file(s) {', '.join(missing)}; a Marian directory "
                "has source.spm, target.spm and vocab.json."
            )
        settings = {}
        config_file = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as f:
                settings = json.load(f)
        if settings.get("separate_vocabs"):
            raise TokenizerFilesError(
                f"{path} uses separate source and target vocabularies (separate_vocabs), which "
                "this library does not support."
            )
        protos = []
        for name in FILES[:2]:
            with open(os.path.join(path, name), "rb") as f:
                protos.append(f.read())
        with open(os.path.join(path, "vocab.json"), encoding="utf-8") as f:
            vocab = json.load(f)
        special = {k: settings[f"{k}_token"] for k in ("unk", "eos", "pad")
                   if isinstance(settings.get(f"{k}_token"), str)}
        try:
            return cls(protos[0], protos[1], vocab, **special)
        except RuntimeError as err:  # sentencepiece cannot parse a model
            raise TokenizerFilesError(
                f"cannot read the SentencePiece models in {path}: {err}") from None

    def save(self, path: str) -> None:
        """Writes ``source.spm``, ``target.spm`` and ``vocab.json`` into ``path``."""
        os.makedirs(path, exist_ok=True)
        for name, proto in zip(FILES[:2], (self.source_proto, self.target_proto), strict=True):
            with open(os.path.join(path, name), "wb") as f:
                f.write(proto)
        with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(self.vocab, f, ensure_ascii=False, indent=2)

    # ------------------------------------------------------------------ ids
    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def id_to_piece(self, index: int) -> str:
        return self.pieces[int(index)]

    def _encode(self, text: str, processor) -> list[int]:
        code, text = _language_code(text)
        pieces = code + processor.encode(text, out_type=str)
        return [self.vocab.get(p, self.unk_id) for p in pieces]

    def encode_one(self, text: str) -> list[int]:
        """Source ids of one string (no EOS)."""
        return self._encode(text, self._source)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Source ids of each string (no EOS)."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings; wrap a single one in [].")
        return [self.encode_one(t) for t in texts]

    def encode_target(self, texts: Sequence[str]) -> list[list[int]]:
        """Target-side ids (``MarianTokenizer(text_target=...)``), no EOS."""
        return [self._encode(t, self._target) for t in texts]

    def batch(self, texts: Sequence[str]) -> np.ndarray:
        """``[B, S]`` int32 source ids with EOS appended, right-padded with ``pad_id``."""
        rows = [ids + [self.eos_id] for ids in self.encode(texts)]
        out = np.full((len(rows), max(map(len, rows), default=1)), self.pad_id, np.int32)
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out

    def decode(self, ids) -> list[str]:
        """Text of each row: cut at the first EOS, pad and special pieces dropped, pieces
        joined by the source model (as transformers does for a shared vocabulary)."""
        if isinstance(ids, list | tuple):
            rows = [[int(i) for i in row] for row in ids]
        else:  # numpy or jax array [B, T]
            rows = np.asarray(ids).reshape(len(ids), -1).tolist()
        out = []
        for row in rows:
            if self.eos_id in row:
                row = row[: row.index(self.eos_id)]
            pieces = [self.pieces[i] for i in row if i not in (self.pad_id, self.unk_id)]
            out.append(self._source.decode_pieces(pieces).replace("\u2581", " ").strip())
        return out

    # ------------------------------------------------------------------ work directories
    def joint_model_proto(self, order: Sequence[int]) -> bytes:
        """One SentencePiece model whose piece ``k`` is ``vocab.json``'s id ``order[k]``.

        ``order`` must start with the pad, EOS and unk ids (they become 0, 1, 2: CONTROL,
        CONTROL, UNKNOWN). Pieces of the source model keep its type and score, language
        codes (``>>xx<<``) become USER_DEFINED, every other piece UNUSED.
        """
        order = [int(i) for i in order]
        if order[:3] != [self.pad_id, self.eos_id, self.unk_id] or sorted(order) != list(
                range(self.vocab_size)):
            raise ValueError("order must be a permutation of the ids starting with pad, eos, unk.")
        source = spm_pb2.ModelProto()
        source.ParseFromString(self.source_proto)
        known = {p.piece: p for p in source.pieces
                 if p.type in (_Piece.NORMAL, _Piece.USER_DEFINED, _Piece.BYTE)}
        model = spm_pb2.ModelProto()
        model.CopyFrom(source)
        del model.pieces[:]
        for k, index in enumerate(order):
            piece = self.pieces[index]
            kind = {0: _Piece.CONTROL, 1: _Piece.CONTROL, 2: _Piece.UNKNOWN}.get(k)
            score = 0.0
            if kind is None and piece in known:
                kind, score = known[piece].type, known[piece].score
            elif kind is None:
                code = piece.startswith(">>") and piece.endswith("<<")
                kind = _Piece.USER_DEFINED if code else _Piece.UNUSED
            model.pieces.add(piece=piece, score=score, type=kind)
        spec = model.trainer_spec
        spec.pad_id, spec.eos_id, spec.unk_id, spec.bos_id = 0, 1, 2, -1
        spec.pad_piece, spec.eos_piece = self.pieces[order[0]], self.pieces[order[1]]
        spec.unk_piece = self.pieces[order[2]]
        spec.vocab_size = len(order)
        spec.byte_fallback = spec.byte_fallback and all(
            f"<0x{b:02X}>" in self.vocab for b in range(256))
        return model.SerializeToString()
