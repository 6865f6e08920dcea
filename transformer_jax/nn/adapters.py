"""Params trees of LoRA-adapted models (``nn.lora``): split, label, hash, freeze, merge::

    labels = adapter_labels(params)              # "adapter" / "frozen" per leaf (optax labels)
    model_def = train_adapters_only(model_def)   # base weights get stop_gradient in merge
    config, params = merge_lora(config, params)  # adapters folded in: a plain model again
"""

from __future__ import annotations

import dataclasses
import hashlib

import jax
import numpy as np

from transformer_jax import ops
from transformer_jax.config import ModelConfig
from transformer_jax.nn.build import ModelDef
from transformer_jax.nn.lora import ADAPTER_SUFFIX, is_adapter

__all__ = ["adapter_labels", "adapter_params", "base_params", "base_sha256", "merge_lora",
           "train_adapters_only", "with_adapters"]


def adapter_labels(params):
    """``params`` with each leaf replaced by "adapter" or "frozen" (``optax`` labels)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "adapter" if is_adapter(path) else "frozen", params)


def _select(params, keep_adapters: bool) -> dict:
    """The nested dict of the adapter (or base) leaves only."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if is_adapter(path) != keep_adapters:
            continue
        node = out
        keys = [getattr(k, "key", getattr(k, "idx", k)) for k in path]
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = leaf
    return out


def adapter_params(params) -> dict:
    """The adapters of a params tree (nested dict, same paths)."""
    return _select(params, True)


def base_params(params) -> dict:
    """Everything but the adapters."""
    return _select(params, False)


def with_adapters(params, adapters):
    """``params`` with the adapter leaves taken from ``adapters`` (same paths)."""
    flat = {jax.tree_util.keystr(p): leaf
            for p, leaf in jax.tree_util.tree_leaves_with_path(adapters)}
    return jax.tree_util.tree_map_with_path(
        lambda p, leaf: flat.get(jax.tree_util.keystr(p), leaf) if is_adapter(p) else leaf,
        params)


def base_sha256(params) -> str:
    """sha256 over the base leaves' paths, dtypes, shapes and bytes (adapters excluded)."""
    digest = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(base_params(params)),
                             key=lambda item: jax.tree_util.keystr(item[0])):
        array = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class _AdapterModelDef(ModelDef):
    """A ``ModelDef`` whose base weights carry no gradient (``stop_gradient`` at merge)."""

    def merge(self, params):
        frozen = jax.tree_util.tree_map_with_path(
            lambda p, x: x if is_adapter(p) else jax.lax.stop_gradient(x), params)
        return super().merge(frozen)

    __hash__ = object.__hash__
    __eq__ = object.__eq__


def train_adapters_only(model_def: ModelDef) -> ModelDef:
    """``model_def`` whose merged model differentiates only the adapters: the backward pass
    computes no weight gradient of the base (an exact zero)."""
    return _AdapterModelDef(model_def.graphdef, model_def.rest)


def merge_lora(config: ModelConfig, params) -> tuple[ModelConfig, dict]:
    """Folds every adapter into its weight: ``(config without LoRA, params)`` of a plain model
    that computes the adapted function at the base's speed."""
    scale = config.lora_alpha / max(config.lora_rank, 1)
    merged = base_params(params)  # fresh dicts: safe to update in place

    def visit(node, adapters):
        for key, value in adapters.items():
            if not str(key).endswith(ADAPTER_SUFFIX):
                visit(node[key], value)
                continue
            target = str(key)[: -len(ADAPTER_SUFFIX)]
            # attention kernels are leaves ([D, N, H], [N, H, D]); nnx.Linear holds "kernel"
            holder, leaf = ((node[target], "kernel") if isinstance(node[target], dict)
                            else (node, target))
            w = holder[leaf]
            flat = w.reshape(value["a"].shape[0], -1)  # [D_in, D_out]
            holder[leaf] = ops.lora_merge(flat, value["a"], value["b"], scale).reshape(w.shape)

    visit(merged, adapter_params(params))
    return dataclasses.replace(config, lora_rank=0), merged
