"""Multi-head attention as a pure function: project to heads, attend, merge heads.

``multi_head_attention(inputs_q, inputs_kv, params)`` with a plain dict of ``[D, N, H]``
projections around ``ops.dot_product_attention`` (any of its implementations); the
projection helpers are shared with ``nn.MultiHeadAttention``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from jax import lax

from transformer_jax.ops.attention import dot_product_attention
from transformer_jax.ops.masks import AttentionSpec
from transformer_jax.ops.shapes import shape_of

__all__ = ["inert_key_bias", "multi_head_attention", "project_out", "project_qkv"]


def inert_key_bias(bias):
    """The key projection's bias ``[N, H]`` with its gradient set to exactly zero (or None).

    Adding ``b`` to every key adds the same ``q . b`` to all logits of a query row, which the
    softmax cancels: outputs never depend on ``b`` and its true gradient is zero. Computed, the
    gradient is rounding noise, and Adam (which divides by its own running scale) turns noise
    into steps of the learning rate's size — different for every summation order, so one
    device and several would train different key biases. ``stop_gradient`` gives the exact 0.
    """
    return None if bias is None else lax.stop_gradient(bias)


def project_qkv(inputs, kernel, bias=None, *, precision=None) -> jnp.ndarray:
    """Projects ``[B, T, D]`` inputs to per-head ``[B, T, N, H]`` with a ``[D, N, H]`` kernel
    (keys and values of grouped-query attention: ``[D, K, H]`` -> ``[B, S, K, H]``).

    Args:
      inputs: ``[B, T, D]``.
      kernel: ``[D, N, H]``.
      bias: optional ``[N, H]``.
    """
    out = jnp.einsum("BTD,DNH->BTNH", inputs, kernel, precision=precision)  # [B, T, N, H]
    if bias is not None:
        out = out + bias
    return out


def project_out(heads, kernel, bias=None, *, precision=None) -> jnp.ndarray:
    """Merges heads ``[B, T, N, H]`` back to ``[B, T, D]`` with an ``[N, H, D]`` kernel.

    Args:
      heads: ``[B, T, N, H]``.
      kernel: ``[N, H, D]``.
      bias: optional ``[D]``.
    """
    out = jnp.einsum("BTNH,NHD->BTD", heads, kernel, precision=precision)  # [B, T, D]
    if bias is not None:
        out = out + bias
    return out


_PARAM_NAMES = ("query", "key", "value", "out", "query_bias", "key_bias", "value_bias",
                "out_bias")


def _check_names(params: Mapping[str, Any]) -> None:
    missing = [k for k in ("query", "key", "value", "out") if k not in params]
    if missing:
        raise ValueError(
            f"multi_head_attention params are missing {missing}; expected keys 'query' "
            "([D, N, H]), 'key', 'value' ([D, K, H], K dividing N), 'out' ([N, H, D]) and "
            "optional '*_bias'."
        )
    unknown = sorted(set(params) - set(_PARAM_NAMES))
    if unknown:
        raise ValueError(f"multi_head_attention got unknown params {unknown}.")


def _check_params(params: Mapping[str, Any], d_q: int, d_kv: int) -> tuple[int, int, int]:
    """Validates the projection shapes; returns (N, K, H)."""
    _check_names(params)
    q_shape = shape_of(params["query"])
    if len(q_shape) != 3 or q_shape[0] != d_q:
        raise ValueError(
            f"params['query'] must have shape [D, N, H] with D = inputs_q.shape[-1] = {d_q}; "
            f"got {q_shape}."
        )
    _, n, h = q_shape
    k_shape = shape_of(params["key"])
    kh = k_shape[1] if len(k_shape) == 3 and k_shape[1] > 0 and n % k_shape[1] == 0 else n
    expected = {
        "key": (d_kv, kh, h),
        "value": (d_kv, kh, h),
        "out": (n, h, None),
        "query_bias": (n, h),
        "key_bias": (kh, h),
        "value_bias": (kh, h),
    }
    for name, want in expected.items():
        if name not in params or params[name] is None:
            continue
        got = shape_of(params[name])
        if len(got) != len(want) or any(
            w is not None and g != w for g, w in zip(got, want, strict=True)
        ):
            shown = tuple("D_out" if w is None else w for w in want)
            raise ValueError(f"params[{name!r}] must have shape {shown}; got {got}"
                             + (" (key/value heads K must divide N)." if name == "key" else "."))
    d_out = shape_of(params["out"])[-1]
    if params.get("out_bias") is not None and shape_of(params["out_bias"]) != (d_out,):
        raise ValueError(
            f"params['out_bias'] must have shape ({d_out},); got {shape_of(params['out_bias'])}."
        )
    return n, kh, h


def multi_head_attention(
    inputs_q,
    inputs_kv,
    params: Mapping[str, Any],
    *,
    mask=None,
    bias=None,
    dropout_rate: float = 0.0,
    dropout_rng=None,
    implementation: str = "xla",
    return_weights: bool = False,
    precision=None,
    chunk_size: int = 512,
    spec: AttentionSpec | None = None,
):
    """Multi-head attention: project, attend per head, merge heads.

    Args:
      inputs_q: ``[B, T, D]`` queries.
      inputs_kv: ``[B, S, D]`` keys/values (pass ``inputs_q`` for self-attention).
      params: ``{"query": [D, N, H], "key": [D, K, H], "value": [D, K, H], "out": [N, H, D]}``
        (K = N, or fewer key/value heads dividing N: grouped-query attention) plus optional
        ``"query_bias"`` ``[N, H]``, ``"key_bias"``, ``"value_bias"`` ``[K, H]`` and
        ``"out_bias"`` ``[D]``.
      mask, bias, spec, dropout_rate, dropout_rng, implementation, precision, chunk_size: as
        in ``dot_product_attention``.
      return_weights: also return the ``[B, N, T, S]`` weights (``"xla"`` only).

    Returns:
      ``[B, T, D]`` or ``(out, weights)``.
    """
    inputs_q, inputs_kv = jnp.asarray(inputs_q), jnp.asarray(inputs_kv)
    for name, x in (("inputs_q", inputs_q), ("inputs_kv", inputs_kv)):
        if x.ndim != 3:
            raise ValueError(f"{name} must have shape [B, length, D]; got {tuple(x.shape)}.")
    if inputs_q.shape[0] != inputs_kv.shape[0]:
        raise ValueError(
            f"inputs_q {tuple(inputs_q.shape)} and inputs_kv {tuple(inputs_kv.shape)} have "
            "different batch sizes."
        )
    _check_params(params, inputs_q.shape[-1], inputs_kv.shape[-1])
    q = project_qkv(inputs_q, params["query"], params.get("query_bias"), precision=precision)
    k = project_qkv(inputs_kv, params["key"], inert_key_bias(params.get("key_bias")),
                    precision=precision)
    v = project_qkv(inputs_kv, params["value"], params.get("value_bias"), precision=precision)
    result = dot_product_attention(
        q,
        k,
        v,
        mask=mask,
        bias=bias,
        spec=spec,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        implementation=implementation,
        chunk_size=chunk_size,
        return_weights=return_weights,
        precision=precision,
    )
    heads, weights = result if return_weights else (result, None)
    out = project_out(heads, params["out"], params.get("out_bias"), precision=precision)
    return (out, weights) if return_weights else out
