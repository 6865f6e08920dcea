"""Hugging Face Marian directories: read (``from_pretrained``), write (``save_pretrained``)
and decode like transformers' ``generate()``. Import these from ``interop.marian``.

A directory holds ``config.json``, ``model.safetensors`` (or ``pytorch_model.bin``) and the
tokenizer files ``source.spm``, ``target.spm``, ``vocab.json``. Models here use Marian's own
ids (OPUS-MT: ``</s>`` 0, ``<unk>`` 1, ``<pad>`` V - 1, the decoder starts with ``<pad>``).
"""

from __future__ import annotations

import functools
import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from transformer_jax import decoding
from transformer_jax.config import ModelConfig
from transformer_jax.interop.marian.tokenizer import MarianTokenizer
from transformer_jax.interop.marian.weights import (
    ConversionError,
    hf_config_from_model,
    model_config_from_hf,
    params_from_state_dict,
    prune_like,
    state_dict_from_params,
    tables_shared,
)
from transformer_jax.nn import Transformer

__all__ = [
    "Pretrained",
    "model_with_params",
    "model_params",
    "read_pretrained",
    "from_pretrained",
    "generate",
    "read_hf_config",
    "read_state_dict",
    "save_pretrained",
]

SAFETENSORS, TORCH_BIN, CONFIG = "model.safetensors", "pytorch_model.bin", "config.json"
# Files of a Marian directory copied as they are (besides weights, config and tokenizer).
EXTRA_FILES = ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json")


class Pretrained(NamedTuple):
    """What :func:`from_pretrained` returns; unpacks as ``(model, config, tokenizer)`` and,
    called, runs the model (``pretrained(batch)`` -> logits, see ``nn.model``)."""

    model: Transformer
    config: ModelConfig
    tokenizer: MarianTokenizer | None

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)


# ----------------------------------------------------------------------------- reading
def read_hf_config(path: str) -> dict:
    """``config.json`` of a Marian directory as a dict."""
    if not os.path.isdir(path):
        raise ConversionError(f"no directory at {path}; pass a local Marian model directory.")
    file = os.path.join(path, CONFIG)
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConversionError(
            f"{path} has no {CONFIG}; is it a Hugging Face model directory?") from None
    except json.JSONDecodeError as err:
        raise ConversionError(f"{file} is not valid JSON ({err}).") from None


def _strip(state: dict) -> dict[str, np.ndarray]:
    return {(k[len("model."):] if k.startswith("model.") else k): v for k, v in state.items()}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Float32 numpy weights of a Marian directory, ``model.`` prefixes removed.

    ``model.safetensors`` is preferred; a ``pytorch_model.bin`` is read with
    ``torch.load(weights_only=True)`` (no arbitrary pickled objects) and needs torch.
    """
    safetensors_file = os.path.join(path, SAFETENSORS)
    if os.path.isfile(safetensors_file):
        try:
            return _strip(load_file(safetensors_file))
        except Exception as err:  # noqa: BLE001 - any reader error means unusable weights
            raise ConversionError(f"cannot read {safetensors_file}: {err}.") from None
    bin_file = os.path.join(path, TORCH_BIN)
    if not os.path.isfile(bin_file):
        raise ConversionError(f"{path} has neither {SAFETENSORS} nor {TORCH_BIN}.")
    try:  # torch is optional (the `interop` extra); only this legacy format needs it
        import torch
    except ImportError:
        raise ConversionError(
            f"{bin_file} needs torch to read; install it (pip install 'transformer-jax"
            "[interop]') or convert the directory to model.safetensors."
        ) from None
    try:
        state = torch.load(bin_file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise ConversionError(
            f"cannot read {bin_file} safely (weights_only=True): {err}.") from None
    return _strip({k: v.float().numpy() for k, v in state.items()})


def model_params(config: ModelConfig, params) -> tuple[nnx.GraphDef, nnx.State, dict]:
    """``(graphdef, abstract param state, params)`` of ``Transformer(config)``: ``params``
    restricted to the model's tree and checked leaf by leaf for shape."""
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
    expected = nnx.to_pure_dict(state)
    params = prune_like(params, expected)
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(expected),
                                 jax.tree_util.tree_leaves(params), strict=True):
        if tuple(want.shape) != tuple(np.shape(got)):
            raise ConversionError(
                f"weight {jax.tree_util.keystr(path)} has shape {tuple(np.shape(got))} but the "
                f"config needs {tuple(want.shape)}; the weights do not match config.json."
            )
    return graphdef, (state, rest), params


def model_with_params(config: ModelConfig, params) -> Transformer:
    """``Transformer(config)`` holding ``params`` (no random initialisation is run)."""
    graphdef, (state, rest), params = model_params(config, params)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(jnp.asarray, params))
    return nnx.merge(graphdef, state, rest)


def read_pretrained(path: str) -> tuple[dict, ModelConfig, dict]:
    """``(config.json, ModelConfig, params)`` of a Marian directory (Marian's ids)."""
    hf = read_hf_config(path)
    config = model_config_from_hf(hf)
    state = read_state_dict(path)
    if config.share_embeddings and not tables_shared(state):
        config = config.replace(share_embeddings=False)
    return hf, config, model_params(config, params_from_state_dict(state, config))[2]


def from_pretrained(path: str, *, with_tokenizer: bool | None = None) -> Pretrained:
    """Loads a local Hugging Face Marian directory (e.g. a downloaded Helsinki-NLP/opus-mt-*).

    Args:
      path: directory with ``config.json``, ``model.safetensors`` (or ``pytorch_model.bin``)
        and, for the tokenizer, ``source.spm``, ``target.spm`` and ``vocab.json``.
      with_tokenizer: True requires the tokenizer files, False skips them; None (default)
        loads them when present.

    Returns:
      ``Pretrained(model, config, tokenizer)``: ``model.decode(tgt_in_ids,
      encoded=model.encode(src_ids), src_ids=src_ids)`` gives the logits of
      ``MarianMTModel(input_ids=src_ids, attention_mask=src_ids != pad,
      decoder_input_ids=tgt_in_ids)`` in Marian's own ids (source padding = ``config.pad_id``),
      and ``model({"inputs": src_ids, "targets": labels})`` those of ``labels=`` (the
      decoder inputs are the labels shifted right behind the pad id, as Marian's).
    """
    _, config, params = read_pretrained(path)
    tokenizer = None
    if with_tokenizer or (with_tokenizer is None and os.path.isfile(
            os.path.join(path, "vocab.json"))):
        tokenizer = MarianTokenizer.from_directory(path)
    return Pretrained(model_with_params(config, params), config, tokenizer)


# ----------------------------------------------------------------------------- writing
def save_pretrained(path: str, config: ModelConfig, params, *, tokenizer=None,
                    hf_config: dict | None = None, extra_dir: str | None = None) -> None:
    """Writes a directory that ``MarianMTModel.from_pretrained(path)`` loads.

    Args:
      path: output directory (created; existing files of the same names are replaced).
      config: the model config (Marian ids: ``pad_id`` is Marian's pad).
      params: ``nnx.to_pure_dict`` params of ``Transformer(config)``.
      tokenizer: optional ``MarianTokenizer`` written next to the weights.
      hf_config: the original ``config.json`` (its other keys are kept).
      extra_dir: directory whose ``EXTRA_FILES`` are copied when present.
    """
    state = state_dict_from_params(jax.device_get(params), config)
    out = hf_config_from_model(config, hf_config)
    os.makedirs(path, exist_ok=True)
    save_file(state, os.path.join(path, SAFETENSORS), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    if tokenizer is not None:
        tokenizer.save(path)
    for name in EXTRA_FILES if extra_dir else ():
        src = os.path.join(extra_dir, name)
        if os.path.isfile(src):
            with open(src, "rb") as f_in, open(os.path.join(path, name), "wb") as f_out:
                f_out.write(f_in.read())


# ----------------------------------------------------------------------------- decoding
def generate(model: Transformer, src_ids, *, num_beams: int = 1, length_penalty: float = 1.0,
             max_length: int = 20, eos_id: int = 0, decoder_start_id: int | None = None,
             forbid_pad: bool = True) -> np.ndarray:
    """Greedy / beam search as transformers' ``MarianMTModel.generate()``.

    Matches ``generate(input_ids, attention_mask=src != pad, num_beams, length_penalty,
    max_length, early_stopping=False, forced_eos_token_id=eos_id, bad_words_ids=[[pad]])``:
    ``max_length`` counts the decoder start token, so at most ``max_length - 1`` tokens come
    out and the last one is forced to EOS.

    Args:
      model: a ``Transformer`` (e.g. from :func:`from_pretrained`).
      src_ids: ``[B, S]`` source ids padded with ``model.config.pad_id``.
      num_beams, length_penalty, max_length: as in ``generate()``.
      eos_id: EOS id (Marian: 0).
      decoder_start_id: first decoder input (default: the pad id, as Marian).
      forbid_pad: never produce the pad id (``bad_words_ids=[[pad]]`` of OPUS-MT configs).

    Returns:
      ``[B, max_length - 1]`` int32 ids: tokens, EOS, then pad.
    """
    if max_length < 2:
        raise ValueError(f"max_length={max_length} must be at least 2 (start token + EOS).")
    pad = model.config.pad_id
    src_ids = jnp.asarray(src_ids, jnp.int32)
    start = pad if decoder_start_id is None else decoder_start_id
    graphdef, state = nnx.split(model)
    out = _search(graphdef, state, src_ids, num_beams=int(num_beams),
                  alpha=float(length_penalty), steps=int(max_length) - 1, eos=int(eos_id),
                  start=int(start), forbid=(pad,) if forbid_pad else ())
    return np.asarray(out)


@functools.partial(jax.jit, static_argnums=0, static_argnames=(
    "num_beams", "alpha", "steps", "eos", "start", "forbid"))
def _search(graphdef, state, src_ids, *, num_beams, alpha, steps, eos, start, forbid):
    model = nnx.merge(graphdef, state)
    pad = model.config.pad_id
    batch = src_ids.shape[0]
    encoded = model.encode(src_ids)  # [B, S, D]
    cache = model.init_cache(batch, steps, encoded=encoded, src_ids=src_ids)

    def tokens_to_logits(ids, cache):  # ids [B', 1]
        logits, cache = model.decode(ids, cache=cache)  # [B', 1, V]
        return logits[:, 0, :], cache

    start_ids = jnp.full((batch,), start, jnp.int32)
    common = dict(batch_size=batch, max_len=steps, eos_id=eos, pad_id=pad, start_ids=start_ids,
                  forbid_ids=forbid)
    if num_beams == 1:
        return decoding.greedy_search(cache, tokens_to_logits, **common)
    return decoding.beam_search(cache, tokens_to_logits, beam_size=num_beams, alpha=alpha,
                                convention="huggingface", **common)[0][:, 0]

