"""Translating with an encoder-decoder model: ``Translator``, ``make_translate_fn``, attention.

``Translator(model, tokenizer)`` wraps a model in memory (``params=`` to use other weights);
``Translator.from_workdir`` / ``inference.load`` read a trained work directory. ``translate``
sorts the sentences by token length, decodes them in batches whose shapes come from a small
fixed set (rows and source length rounded up to a power of two or 1.5 times one), so a long
list compiles a handful of programs, and returns the outputs in input order. Empty (or
blank) sentences give empty outputs; sentences longer than the model's source limit are cut
(a warning on stderr counts them). Each output may be at most ``source length + 50``
tokens long (the paper's limit), EOS included, and no longer than the decode buffer
(``max_len``).

Attention heatmaps::

    maps = attention_maps(translator, "twenty one")          # translates first
    maps["cross"]            # [L, N, T, S] decoder->encoder weights, per layer and head
    maps["source_tokens"]    # S piece strings, the last is "</s>"
    maps["target_tokens"]    # T piece strings, the last is "</s>"
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transformer_jax import decoding
from transformer_jax.checkpoints import read_run
from transformer_jax.data.preprocess import source_transform
from transformer_jax.data.tokenizer import EOS_ID, PAD_ID, Tokenizer
from transformer_jax.nn import QUANTIZE_MODES, quantize_int8, split_model

__all__ = ["EXTRA_LENGTH", "Translator", "attention_maps", "make_translate_fn"]

EXTRA_LENGTH = 50  # paper: "maximum output length to input length + 50"
MIN_BUCKET = 8  # shortest padded source length


# ------------------------------------------------------------------------------ decoding
def make_translate_fn(model_def, *, max_length: int, beam_size: int = 1,
                      length_penalty: float = 0.6, extra_length: int | None = None,
                      pad_id: int = PAD_ID, min_length: int = 0):
    """Jitted ``translate(params, src_ids [B, S]) -> ids [B, max_length]`` (EOS-terminated).

    Greedy search for ``beam_size == 1``, else the best beam of ``beam_search``, from the
    model's ``init_decoding(src_ids, max_length)`` (``nn.model``: for a language model the
    "source" is a prompt it continues). Models of the same architecture (equal
    ``graphdef``) share the compiled programs.

    Args:
      model_def: ``nn.ModelDef`` of a model.
      max_length: decode buffer length (output columns and cache length).
      beam_size, length_penalty: search settings (paper: 4 and 0.6).
      extra_length: when given, each example's output (EOS included) is capped at its
        source length (non-pad tokens) plus ``extra_length`` (paper: 50), and at
        ``max_length``; None caps every example at ``max_length`` only.
      pad_id: source padding id.
      min_length: shortest output, EOS included (EOS masked before; ``min_length ==
        max_length`` makes every output exactly ``max_length`` tokens, for benchmarks).
    """
    program = _translate_program(model_def.graphdef, int(max_length), int(beam_size),
                                 float(length_penalty), extra_length, int(pad_id),
                                 int(min_length))
    rest = model_def.rest
    return lambda params, src_ids: program(params, rest, src_ids)


@functools.lru_cache(maxsize=64)
def _translate_program(graphdef, max_length, beam_size, length_penalty, extra_length, pad_id,
                       min_length):
    def translate(params, rest, src_ids):
        model = nnx.merge(graphdef, params, rest)
        batch = src_ids.shape[0]
        cache, start_ids = model.init_decoding(src_ids, max_length, beams=beam_size)
        max_lengths = None
        if extra_length is not None:
            max_lengths = jnp.sum(src_ids != pad_id, axis=1) + extra_length  # [B]

        def tokens_to_logits(ids, cache):  # ids [B', 1]
            logits, cache = model.decode(ids, cache=cache)  # [B', 1, V]
            return logits[:, 0, :], cache

        forbid = (pad_id,) if model.config.never_predict_pad else ()
        if beam_size == 1:
            return decoding.greedy_search(
                cache, tokens_to_logits, batch_size=batch, max_len=max_length, eos_id=EOS_ID,
                max_lengths=max_lengths, forbid_ids=forbid, start_ids=start_ids,
                min_len=min_length)
        return decoding.beam_search(
            cache, tokens_to_logits, batch_size=batch, beam_size=beam_size,
            max_len=max_length, eos_id=EOS_ID, alpha=length_penalty, max_lengths=max_lengths,
            forbid_ids=forbid, start_ids=start_ids, min_len=min_length, beam_cache=True,
        )[0][:, 0]

    return jax.jit(translate)


def _bucket(length: int, cap: int, floor: int = MIN_BUCKET) -> int:
    """Smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and 1.5 times them)
    >= ``length``, at least ``floor`` and at most ``cap``: two shapes per octave, so padding
    wastes at most a third (a half with powers of two alone)."""
    length = max(int(length), floor, 1)
    step = 1 << max(0, (length - 1).bit_length() - 2)  # [B, S] grid: 8, 16 | 24, 32 | 48 ...
    return min(cap, -(-length // step) * step)


def _until_eos(ids: list[int]) -> list[int]:
    """The tokens of one search output before its first EOS (or PAD)."""
    for i, token in enumerate(ids):
        if token in (EOS_ID, PAD_ID):
            return ids[:i]
    return ids


@functools.partial(jax.jit, static_argnums=0)
def _attention_weights(graphdef, params, rest, batch):
    """Teacher-forced weights ``{"encoder_self", "decoder_self", "decoder_cross"}``."""
    model = nnx.merge(graphdef, params, rest)
    return model.with_attention(batch)[1]


class Translator:
    """A model, its parameters and its tokenizer, ready to translate sentences.

    Args:
      model: a model that translates (``model.translates``: the encoder-decoder
        ``nn.Transformer``), concrete, or abstract from ``nnx.eval_shape`` when ``params``
        is given.
      tokenizer: the ``Tokenizer`` the model was trained with.
      params: parameter dict (``nnx.to_pure_dict`` layout); default: the model's own.
      max_source_length: longest source in tokens, EOS included (default the model's
        ``max_len``); longer sentences are cut to it.
      max_decode_length: decode buffer, the longest output in tokens (default ``max_len``).
      extra_length: outputs are capped at source length + this (paper: 50).
      normalize: applied to every source sentence before tokenizing (``from_workdir`` passes
        ``data.preprocess.source_transform`` of the run: what its training pairs went through).
      quantize: "int8" decodes with int8 weights (``nn.int8``: int8 x int8 matmuls for
        batches of rows, every projection's weights rounded to int8); None keeps the weights.
      program_store: an ``exported.ProgramStore``: the translate programs are exported there
        once and read back by later processes, which then skip tracing and lowering them.
    """

    def __init__(self, model, tokenizer: Tokenizer, *, params=None,
                 max_source_length: int | None = None, max_decode_length: int | None = None,
                 extra_length: int = EXTRA_LENGTH,
                 normalize: Callable[[str], str] | None = None, quantize: str | None = None,
                 program_store=None):
        if quantize is not None and quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize={quantize!r} is not supported; use one of "
                             f"{', '.join(QUANTIZE_MODES)} or None (float weights).")
        if not model.translates:
            raise TypeError(f"Translator needs a model that translates (an encoder-decoder "
                            f"Transformer), not a {type(model).__name__}; use Generator for "
                            "a language model.")
        self.config = model.config
        self.model_def, own = split_model(model)
        if params is None:
            if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(own)):
                raise ValueError("the model is abstract (nnx.eval_shape); pass params=.")
            params = own
        if quantize == "int8":  # a new module: the caller's model keeps its weights
            self.model_def, params = split_model(quantize_int8(self.model_def.merge(params)))
        self.quantize = quantize
        self.params = jax.device_put(params, jax.local_devices()[0])
        self.tokenizer = tokenizer
        if tokenizer.vocab_size > self.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} pieces but the model only "
                f"{self.config.vocab_size}; use the tokenizer the model was trained with."
            )
        self.max_source_length = int(max_source_length or self.config.max_len)
        self.max_decode_length = int(max_decode_length or self.config.max_len)
        if self.max_source_length < 2 or self.max_decode_length < 2:
            raise ValueError("max_source_length and max_decode_length must be at least 2.")
        self.extra_length = int(extra_length)
        self.normalize = normalize
        self.step: int | None = None  # checkpoint step when loaded from a workdir
        # beam length penalty of the run's evaluation when loaded from a workdir (default
        # of the translate CLI); the paper's 0.6 otherwise
        self.length_penalty = 0.6
        self._fns: dict[tuple, object] = {}
        # the non-param state is closed over by an exported program: only an empty one
        self.program_store = None if jax.tree_util.tree_leaves(self.model_def.rest) else \
            program_store

    @classmethod
    def from_workdir(cls, workdir: str, *, step: int | None = None, averaged: bool = False,
                     **kwargs) -> Translator:
        """Load tokenizer, model config and params of a training work directory.

        Args:
          workdir: the run's ``--workdir``.
          step: checkpoint step (default: the newest).
          averaged: use ``<workdir>/averaged`` (checkpoint averaging) instead.
          **kwargs: forwarded to the constructor (``max_source_length`` ...).

        Raises:
          FileNotFoundError: no such directory, checkpoint or tokenizer (with the path).
        """
        run = read_run(workdir, step, averaged)
        if not run["model"].translates:
            raise ValueError(
                f"the run in {workdir} trained a {type(run['model']).__name__}, which does not "
                "translate; load it with transformer_jax.inference.load."
            )
        kwargs.setdefault("normalize", source_transform(run["data"]))
        translator = cls(run["model"], run["tokenizer"], params=run["params"], **kwargs)
        translator.step = run["step"]
        if run["length_penalty"] is not None:
            translator.length_penalty = float(run["length_penalty"])
        return translator

    @property
    def model(self) -> nnx.Module:
        """The model with this translator's parameters (a new module on each access)."""
        return self.model_def.merge(self.params)

    # -------------------------------------------------------------------- encoding
    def encode(self, sentences: Sequence[str]) -> tuple[list[list[int] | None], list[int]]:
        """Source ids (EOS appended; None for blank sentences) and the 0-based indices of
        sentences cut to ``max_source_length``."""
        if isinstance(sentences, str):
            raise TypeError("translate takes a list of sentences; wrap a single one in [].")
        sentences = list(sentences)
        for i, text in enumerate(sentences):
            if not isinstance(text, str):
                raise TypeError(f"sentence {i} is a {type(text).__name__}, not a str.")
        if self.normalize is not None:
            sentences = [self.normalize(text) for text in sentences]
        keep = [i for i, text in enumerate(sentences) if text.strip()]
        ids: list[list[int] | None] = [None] * len(sentences)
        cut = []
        for i, row in zip(keep, self.tokenizer.encode([sentences[i] for i in keep]), strict=True):
            if len(row) + 1 > self.max_source_length:
                row = row[: self.max_source_length - 1]
                cut.append(i)
            ids[i] = list(row) + [EOS_ID]
        return ids, cut

    def _warn_cut(self, cut: list[int]) -> None:
        if not cut:
            return
        lines = ", ".join(str(i + 1) for i in cut[:5]) + (", ..." if len(cut) > 5 else "")
        print(f"warning: {len(cut)} input line(s) longer than {self.max_source_length} tokens "
              f"(EOS included) were truncated (line {lines}).", file=sys.stderr, flush=True)

    def _fn(self, buffer: int, beam_size: int, alpha: float, min_length: int = 0):
        key = (buffer, beam_size, float(alpha), self.extra_length, min_length)
        if key not in self._fns:
            fn = make_translate_fn(
                self.model_def, max_length=buffer, beam_size=beam_size, length_penalty=alpha,
                extra_length=self.extra_length, pad_id=self.config.pad_id,
                min_length=min_length)
            if self.program_store is not None:
                fn = self.program_store.wrap(fn, {"translate": key, "pad": self.config.pad_id})
            self._fns[key] = fn
        return self._fns[key]

    # -------------------------------------------------------------------- translation
    def translate_ids(self, rows: list[list[int]], *, beam_size: int = 4,
                      alpha: float | None = None, batch_size: int = 64,
                      min_length: int = 0) -> np.ndarray:
        """Decode EOS-terminated source id lists as one padded batch -> ``[len(rows), L]``
        (``alpha`` None: ``self.length_penalty``; ``min_length``: shortest output, EOS
        included)."""
        alpha = self.length_penalty if alpha is None else alpha
        decoding.check_alpha(alpha)
        n = len(rows)
        longest = max((len(r) for r in rows), default=0)
        if not 0 < longest <= self.max_source_length:
            raise ValueError(
                f"translate_ids needs 1 to {self.max_source_length} ids per row (got rows of up "
                f"to {longest}); use translate(), which cuts long sentences."
            )
        width = _bucket(longest, self.max_source_length)
        height = max(n, _bucket(n, batch_size, floor=1))
        src = np.full((height, width), self.config.pad_id, np.int32)  # [B, S]
        src[:, 0] = EOS_ID  # filler rows hold a lone EOS
        for i, row in enumerate(rows):
            src[i, : len(row)] = row
        buffer = min(width + self.extra_length, self.max_decode_length)
        out = self._fn(buffer, beam_size, alpha, min_length)(self.params, jnp.asarray(src))
        return np.asarray(out)[:n]

    def translate(self, sentences: Sequence[str], *, beam_size: int = 4,
                  alpha: float | None = None, batch_size: int = 64) -> list[str]:
        """Translations of ``sentences`` (same order and count; blank in -> "" out).

        Args:
          sentences: list of source strings.
          beam_size: 1 is greedy search; the paper uses 4.
          alpha: beam-search length penalty (paper: 0.6); None: ``self.length_penalty``, the
            run's ``eval_length_penalty`` when loaded from a workdir.
          batch_size: most sentences decoded together.
        """
        if beam_size < 1 or batch_size < 1:
            raise ValueError(f"beam_size={beam_size} and batch_size={batch_size} must be >= 1.")
        decoding.check_alpha(self.length_penalty if alpha is None else alpha)
        ids, cut = self.encode(sentences)
        self._warn_cut(cut)
        outputs = [""] * len(ids)
        order = sorted((i for i, row in enumerate(ids) if row is not None),
                       key=lambda i: (len(ids[i]), i))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            out = self.translate_ids([ids[i] for i in chunk], beam_size=beam_size, alpha=alpha,
                                     batch_size=batch_size)
            for i, text in zip(chunk, self.tokenizer.decode(out), strict=True):
                outputs[i] = text
        return outputs

    __call__ = translate

    # -------------------------------------------------------------------- attention
    def attention(self, source: str, target: str | None = None, *, beam_size: int = 1,
                  alpha: float = 0.6) -> dict:
        """See :func:`attention_maps`."""
        (src,), cut = self.encode([source])
        self._warn_cut(cut)
        src = src or [EOS_ID]  # a blank source is a lone EOS
        if target is None:  # the generated ids themselves (re-encoding the text may differ)
            out = self.translate_ids([src], beam_size=beam_size, alpha=alpha)  # [1, L]
            target = self.tokenizer.decode(out)[0]
            tgt = _until_eos(out[0].tolist())[: self.max_decode_length - 1] + [EOS_ID]
        else:
            tgt = self.tokenizer.encode_one(target)[: self.max_decode_length - 1] + [EOS_ID]
        s_len, t_len = len(src), len(tgt)
        src_ids = np.full((1, _bucket(s_len, self.max_source_length)), self.config.pad_id,
                          np.int32)
        targets = np.full((1, _bucket(t_len, self.max_decode_length)), self.config.pad_id,
                          np.int32)
        src_ids[0, :s_len] = src
        targets[0, :t_len] = tgt  # the model reads them shifted right, BOS (= pad id) first
        weights = jax.device_get(_attention_weights(
            self.model_def.graphdef, self.params, self.model_def.rest,
            {"inputs": jnp.asarray(src_ids), "targets": jnp.asarray(targets)}))
        piece = self.tokenizer.id_to_piece
        return {
            "cross": np.asarray(weights["decoder_cross"][:, 0, :, :t_len, :s_len]),
            "encoder_self": np.asarray(weights["encoder_self"][:, 0, :, :s_len, :s_len]),
            "decoder_self": np.asarray(weights["decoder_self"][:, 0, :, :t_len, :t_len]),
            "source_tokens": [piece(i) for i in src],
            "target_tokens": [piece(i) for i in tgt],
            "source_ids": list(src),
            "target_ids": list(tgt),
            "source": source,
            "target": target,
        }


def attention_maps(translator: Translator, source: str, target: str | None = None, *,
                   beam_size: int = 1, alpha: float = 0.6) -> dict:
    """Attention weights of one sentence pair, for alignment heatmaps.

    ``translator`` wraps the model, its params and its tokenizer (``load(workdir)``, or
    ``Translator(model, tokenizer, params=params)`` for a model in memory). When ``target``
    is None the source is translated first (greedy unless ``beam_size > 1``). The pair runs
    through one teacher-forced forward pass; the source and the target each end with EOS, so
    the rows of ``cross`` are the positions that predict each target token.

    Returns:
      dict with
        ``cross``: float32 ``[L, N, T, S]`` decoder-to-encoder weights per layer and head;
          every row sums to 1 over the S source tokens (padding is cut off);
        ``encoder_self``: ``[L, N, S, S]``; ``decoder_self``: ``[L, N, T, T]``;
        ``source_tokens`` / ``target_tokens``: S / T SentencePiece pieces (str, the last
          is "</s>") for axis labels; ``source_ids`` / ``target_ids``: the ids;
        ``source`` / ``target``: the strings (``target`` is the translation when computed).
    """
    if not isinstance(translator, Translator):
        raise TypeError(
            f"attention_maps takes a Translator, not a {type(translator).__name__}; wrap a "
            "model with Translator(model, tokenizer, params=params)."
        )
    return translator.attention(source, target, beam_size=beam_size, alpha=alpha)
