"""LoRA adapters saved alone, tied to the base model they were trained on.

``save_adapters(directory, params, config)`` writes ``adapters.npz`` (the adapter leaves by
path; no pickle) and ``adapters.json`` (LoRA settings and the sha256 of the base weights).
``load_adapters(directory, params)`` puts them into an adapted model's params and refuses a
base whose sha256 differs, in one sentence. Both files are written under temporary names and
renamed, so a failed save leaves nothing half-written.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from transformer_jax.config import ModelConfig
from transformer_jax.nn.adapters import adapter_params, base_sha256, with_adapters

__all__ = ["ADAPTER_ARRAYS", "ADAPTER_META", "load_adapters", "save_adapters"]

ADAPTER_ARRAYS = "adapters.npz"
ADAPTER_META = "adapters.json"


def save_adapters(directory: str, params, config: ModelConfig) -> str:
    """Writes the adapters of ``params`` and the base's sha256; returns the sha256."""
    adapters = adapter_params(params)
    if not adapters:
        raise ValueError("these params hold no LoRA adapters; build the model with "
                         "lora_rank > 0.")
    arrays = {jax.tree_util.keystr(p): np.asarray(x)
              for p, x in jax.tree_util.tree_leaves_with_path(adapters)}
    sha = base_sha256(params)
    meta = {"base_sha256": sha, "lora_rank": config.lora_rank, "lora_alpha": config.lora_alpha,
            "lora_targets": config.lora_targets}
    os.makedirs(directory, exist_ok=True)
    tmp_npz = os.path.join(directory, ".tmp-" + ADAPTER_ARRAYS)
    tmp_json = os.path.join(directory, ".tmp-" + ADAPTER_META)
    with open(tmp_npz, "wb") as f:
        np.savez(f, **arrays)
    with open(tmp_json, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp_npz, os.path.join(directory, ADAPTER_ARRAYS))
    os.replace(tmp_json, os.path.join(directory, ADAPTER_META))
    return sha


def load_adapters(directory: str, params):
    """``params`` (of a model with the same LoRA settings) with the saved adapters.

    Raises:
      ValueError: missing files, a different base (sha256) or adapters that do not fit.
    """
    meta_path = os.path.join(directory, ADAPTER_META)
    if not os.path.isfile(meta_path):
        raise ValueError(f"no {ADAPTER_META} in {directory}; pass the directory that "
                         "save_adapters wrote.")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    sha = base_sha256(params)
    if meta["base_sha256"] != sha:
        raise ValueError(
            f"the adapters in {directory} were trained on base {meta['base_sha256'][:12]} but "
            f"these weights are {sha[:12]}; load them onto the base they were trained on.")
    with np.load(os.path.join(directory, ADAPTER_ARRAYS), allow_pickle=False) as saved:
        arrays = dict(saved)
    wanted = {jax.tree_util.keystr(p): np.shape(x)
              for p, x in jax.tree_util.tree_leaves_with_path(adapter_params(params))}
    if {k: v.shape for k, v in arrays.items()} != wanted:
        raise ValueError(f"the adapters in {directory} (lora_rank={meta['lora_rank']}, "
                         f"lora_targets={meta['lora_targets']!r}) do not fit this model's; "
                         "build it with the same LoRA settings.")
    return with_adapters(params, _nest(arrays, adapter_params(params)))


def _nest(flat: dict, like):
    """The flat ``{keystr: array}`` in the structure of ``like``."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: flat[jax.tree_util.keystr(p)].astype(np.asarray(x).dtype), like)
