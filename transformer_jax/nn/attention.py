"""Multi-head attention as an NNX module over ``transformer_jax.ops``, with an explicit KV cache.

Parameters have the layout of ``ops.multi_head_attention``: ``query`` ``[D, N, H]``,
``key``/``value`` ``[D, K, H]`` (K key/value heads dividing the N query heads: grouped-query
attention, K = 1 multi-query; K = N by default), ``out`` ``[N, H, D]``, biases ``[N, H]``,
``[K, H]`` and ``[D]``; ``params_dict()`` returns them as a plain dict that the pure function
accepts.

Three kinds of cache pytree (K heads each, so grouped-query attention shrinks them by N / K):

* incremental self-attention (``init_cache``): ``{"key": [B, K, L, H], "value": [B, K, L, H],
  "index": int32 scalar}``. A call with T new tokens writes their keys/values at
  ``[index, index + T)``, lets query ``i`` attend cached positions ``j <= index + i`` and
  returns the cache with ``index + T``. Writing past ``L`` raises ValueError when ``index`` is
  a concrete number; under ``jax.jit`` (traced index) the outputs of an overflowing call are
  NaN instead of silently attending overwritten keys.
* a sliding-window ring buffer (``init_cache(..., window=w)`` with ``max_len > w + 1``): the
  same dict with ``L = w + 1`` slots; position ``p`` lives in slot ``p % (w + 1)``. A call
  attends the slots still inside its window and its own T new keys, then keeps the newest
  ``w + 1`` keys. It never overflows: memory is that of the window, whatever the length.
* precomputed keys/values (``precompute_kv``, e.g. cross-attention over the encoder output):
  ``{"key": [B, K, H, S], "value": [B, K, S, H]}`` (keys stored transposed) without
  ``"index"``; used as is and returned unchanged, so each decoding step skips re-projecting
  the encoder output. A call with ``G * B`` query rows (beam search: G beams per example,
  rows ``b * G .. b * G + G - 1``) attends them as ``G`` queries of example ``b``, so the
  beams share one copy of the keys.
* a beam cache (``init_cache(..., beams=G)``) for ``G * B`` rows decoding one token per call:
  ``{"key": [B, K, L * G, H], "value": [B, K, L * G, H], "index": int32 scalar, "beam_slot":
  [B * G, L] int32}``. Row ``b * G + g`` writes its position ``index`` to slot
  ``index * G + g`` of example ``b`` (one contiguous write for all beams) and attends, at each
  earlier position ``p``, the slot ``p * G + beam_slot[row, p]``.
  Reordering the beams (``decoding.beam_search``) then permutes the small ``beam_slot`` rows
  instead of copying every key and value; the keys/values lead with B, one per example, and
  are never reordered. Each step attends all ``G * L`` slots of its example under that mask
  (a ``[G, L * G]`` matmul per example and head instead of G ``[1, L]`` ones).

Caches are heads-first (``[B, K, L, H]``, the layout of the score and weighted-value matmuls,
whose batch axes are B and the heads), so no decoding step copies a cache into another layout. The
precomputed keys go one step further, ``[B, N, H, S]`` (the right operand of ``q k^T`` as the
matmul reads it), behind an optimisation barrier that keeps XLA from moving the transposes
back into the decoding loop (docs/cpu_speed.md, section 3, has the measurements).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from transformer_jax import ops
from transformer_jax.nn import kv_cache
from transformer_jax.nn.int8 import INT8_SUFFIX, quantize_weight
from transformer_jax.nn.lora import LoRA
from transformer_jax.nn.partitioning import logical_param

__all__ = ["MultiHeadAttention"]

_qkv_init = jax.nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))  # [D, N, H]
_out_init = jax.nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2)  # [N, H, D]


class MultiHeadAttention(nnx.Module):
    """Multi-head (self or cross) attention ``Concat(head_1..head_N) W_O``.

    Args:
      d_model: D, width of the inputs and outputs.
      num_heads: N; the head dim is H = D / N.
      num_kv_heads: K, key/value heads (None = N); K must divide N.
      use_bias: add ``*_bias`` parameters to the four projections.
      dropout_rate: dropout on the attention weights (active when a ``dropout_rng`` is given).
      implementation: ``ops.dot_product_attention`` implementation ("xla", "chunked", "jax",
        "splash"; with a cache, "splash" computes as "xla").
      chunk_size: query/key block size of "chunked".
      precision: matmul precision of the attention ("default", "high", "highest").
      rope: rotate queries and keys by their positions (``ops.apply_rope``) before attending.
      dtype: compute dtype (inputs and parameters are cast to it); softmax runs in float32.
      param_dtype: dtype of the stored parameters.
      lora: ``{"rank": r, "alpha": a, "targets": names}`` adds a ``LoRA`` adapter
        ``<name>_lora`` to each named projection ("query", "key", "value", "out").
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        use_bias: bool = True,
        dropout_rate: float = 0.0,
        implementation: str = "xla",
        chunk_size: int = 512,
        precision: str = "default",
        rope: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        lora: dict | None = None,
        rngs: nnx.Rngs,
    ):
        if d_model % num_heads:
            raise ValueError(
                f"d_model={d_model} is not divisible by num_heads={num_heads}; choose num_heads "
                "that divides d_model."
            )
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads={num_kv_heads} must be a positive divisor of num_heads="
                f"{num_heads}; choose one that divides it (1 = multi-query attention)."
            )
        self.d_model, self.num_heads, self.num_kv_heads = d_model, num_heads, num_kv_heads
        self.head_dim = d_model // num_heads
        self.use_bias, self.dropout_rate = use_bias, dropout_rate
        self.implementation, self.rope = implementation, rope
        self.chunk_size = chunk_size
        self.precision = None if precision == "default" else precision
        self.dtype, self.param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
        n, k, h, d = num_heads, num_kv_heads, self.head_dim, d_model
        qkv, heads = ("embed", "heads", "kv"), ("heads", "kv")  # logical axes, nn.partitioning
        self.query = logical_param(_qkv_init(rngs.params(), (d, n, h), self.param_dtype), qkv)
        self.key = logical_param(_qkv_init(rngs.params(), (d, k, h), self.param_dtype), qkv)
        self.value = logical_param(_qkv_init(rngs.params(), (d, k, h), self.param_dtype), qkv)
        self.out = logical_param(
            _out_init(rngs.params(), (n, h, d), self.param_dtype), ("heads", "kv", "embed"))
        if use_bias:
            self.query_bias = logical_param(jnp.zeros((n, h), self.param_dtype), heads)
            self.key_bias = logical_param(jnp.zeros((k, h), self.param_dtype), heads)
            self.value_bias = logical_param(jnp.zeros((k, h), self.param_dtype), heads)
            self.out_bias = logical_param(jnp.zeros((d,), self.param_dtype), ("embed",))
        sizes = {"query": (d, n * h), "key": (d, k * h), "value": (d, k * h), "out": (n * h, d)}
        for name in (lora or {}).get("targets", ()):
            if name in sizes:
                setattr(self, f"{name}_lora", LoRA(*sizes[name], rank=lora["rank"],
                                                   alpha=lora["alpha"],
                                                   param_dtype=self.param_dtype, rngs=rngs))

    # ------------------------------------------------------------------ parameters

    _NAMES = ("query", "key", "value", "out")

    def params_dict(self) -> dict[str, jax.Array]:
        """The parameters as ``ops.multi_head_attention`` expects them (plain arrays)."""
        names = self._NAMES + (tuple(f"{k}_bias" for k in self._NAMES) if self.use_bias else ())
        return {name: getattr(self, name)[...] for name in names}

    def _param(self, name: str):
        """Parameter ``name`` cast to the compute dtype (None for an absent bias)."""
        if name.endswith("_bias") and not self.use_bias:
            return None
        return getattr(self, name)[...].astype(self.dtype)

    def _project(self, inputs, name: str) -> jax.Array:
        """``[B, T, D]`` -> ``[B, T, N, H]`` with the ``name`` projection (K heads for keys and
        values)."""
        bias = self._param(f"{name}_bias")
        if name == "key":
            bias = ops.inert_key_bias(bias)  # no effect on outputs, so an exact zero gradient
        inputs, kernel = inputs.astype(self.dtype), self._param(name)
        adapter = self._adapter(name)
        if adapter is None:
            return ops.project_qkv(inputs, kernel, bias)
        d, n, h = kernel.shape
        out = adapter(inputs, kernel.reshape(d, n * h)).reshape(*inputs.shape[:2], n, h)
        return out if bias is None else out + bias

    def _output(self, heads) -> jax.Array:
        """``[B, T, N, H]`` -> ``[B, T, D]`` with the output projection (and its adapter)."""
        kernel, bias = self._param("out"), self._param("out_bias")
        adapter = self._adapter("out")
        if adapter is None:
            return ops.project_out(heads, kernel, bias)
        b, t, n, h = heads.shape
        out = adapter(heads.reshape(b, t, n * h), kernel.reshape(n * h, -1))
        return out if bias is None else out + bias

    def _adapter(self, name: str):
        """What sits beside projection ``name``'s weight, called as ``adapter(x, w [D_in,
        D_out])``: its LoRA adapter, its int8 weights (``nn.int8``) or None."""
        lora = getattr(self, f"{name}_lora", None)
        return lora if lora is not None else getattr(self, name + INT8_SUFFIX, None)

    def quantize_int8(self, *, min_rows: int) -> None:
        """int8 weights for the four projections (``nn.int8.quantize_int8``)."""
        for name in self._NAMES:
            d_in = self.d_model if name != "out" else self.num_heads * self.head_dim
            setattr(self, name + INT8_SUFFIX,
                    quantize_weight(getattr(self, name), d_in, min_rows=min_rows))

    # ------------------------------------------------------------------ caches

    def init_cache(self, batch: int, max_len: int, dtype=None, *,
                   window: int | None = None, beams: int = 1) -> dict[str, jax.Array]:
        """Empty self-attention cache for ``max_len`` positions.

        With a sliding ``window`` (each query sees ``window`` earlier positions and itself)
        and ``max_len > window + 1``, a ring buffer of ``window + 1`` slots instead (see the
        module docstring); calls must then pass a spec with ``window=(window, 0)``. With
        ``beams = G > 1``, a beam cache for ``batch * G`` rows (module docstring; no window,
        ALiBi or position bias).

        Returns:
          ``{"key": [B, K, L, H], "value": [B, K, L, H], "index": int32 scalar 0}`` with
          ``dtype`` (default: the compute dtype); L = ``min(max_len, window + 1)``; a beam
          cache has ``[B, K, L * G, H]`` keys/values and ``"beam_slot": [B * G, L]``.
        """
        if window is not None:
            max_len = min(max_len, window + 1)
        shape = (batch, self.num_kv_heads, max_len, self.head_dim)
        if beams > 1:
            if window is not None:
                raise ValueError("a beam cache has no sliding window; use beams=1.")
            shape = (batch, self.num_kv_heads, max_len * beams, self.head_dim)
        dtype = self.dtype if dtype is None else dtype
        cache = {
            "key": jnp.zeros(shape, dtype),
            "value": jnp.zeros(shape, dtype),
            "index": jnp.zeros((), jnp.int32),
        }
        if beams > 1:
            cache["beam_slot"] = jnp.zeros((batch * beams, max_len), jnp.int32)
        return cache

    def precompute_kv(self, inputs_kv) -> dict[str, jax.Array]:
        """Projects ``inputs_kv`` ``[B, S, D]`` once: ``{"key": [B, K, H, S], "value":
        [B, K, S, H]}`` (see the module docstring for the layout).

        Pass the result as ``cache=`` to reuse it (cross-attention during decoding). Keys are
        not rotated (RoPE is meant for self-attention).
        """
        key = jnp.transpose(self._project(inputs_kv, "key"), (0, 2, 3, 1))  # [B, K, H, S]
        value = kv_cache.swap_heads(self._project(inputs_kv, "value"))  # [B, K, S, H]
        return lax.optimization_barrier({"key": key, "value": value})

    # ------------------------------------------------------------------ forward

    def __call__(
        self,
        inputs_q,
        inputs_kv=None,
        *,
        mask=None,
        bias=None,
        spec=None,
        positions=None,
        kv_positions=None,
        position_bias: Callable | None = None,
        cache=None,
        dropout_rng=None,
        return_weights: bool = False,
    ):
        """Attends ``inputs_q`` over ``inputs_kv`` (self-attention when it is None).

        Args:
          inputs_q: ``[B, T, D]``.
          inputs_kv: ``[B, S, D]`` or None (= ``inputs_q``; ignored with a precomputed cache).
          mask: bool broadcastable to ``[B, N, T, S]`` (True = attend). With an incremental
            cache, S is the cache length L and the cache validity mask is added here.
          bias: float broadcastable to ``[B, N, T, S]`` (e.g. ``ops.alibi_bias``).
          spec: ``ops.AttentionSpec`` (causal, window, segments, key padding, ALiBi slopes) —
            what the model stacks pass, so "chunked" never sees a ``[T, S]`` array. With an
            incremental cache its causal term and positions are set by the cache.
          positions: ``[B, T]`` query positions for RoPE and ``position_bias`` (default
            ``arange(T)``, or ``index + arange(T)`` with an incremental cache).
          kv_positions: ``[B, S]`` key positions (default ``positions``).
          position_bias: ``f(q_positions [b, T], k_positions [b, S]) -> [b, N, T, S]`` bias
            from the positions of the queries and keys as attended (cache slots included),
            e.g. T5's relative bias; added to ``bias``.
          cache: None, an incremental cache from ``init_cache`` or a precomputed
            ``{"key", "value"}`` from ``precompute_kv`` (see the module docstring).
          dropout_rng: PRNG key for attention-weight dropout (None = no dropout).
          return_weights: also return the float32 ``[B, N, T, S]`` weights (uses "xla").

        Returns:
          ``(out [B, T, D], new_cache, weights or None)``; ``new_cache`` is None without cache.
        """
        inputs_q = jnp.asarray(inputs_q)
        if inputs_q.ndim != 3 or inputs_q.shape[-1] != self.d_model:
            raise ValueError(
                f"inputs_q must have shape [B, T, {self.d_model}]; got {tuple(inputs_q.shape)}."
            )
        batch, length = inputs_q.shape[:2]
        if cache is not None and "beam_slot" in cache:
            return self._beam_step(inputs_q, cache, mask, bias, spec, positions, position_bias,
                                   dropout_rng, return_weights)
        incremental = cache is not None and "index" in cache
        if positions is None and (self.rope or position_bias is not None):
            start = cache["index"] if incremental else 0
            positions = jnp.broadcast_to(start + jnp.arange(length), (batch, length))
        query = self._project(inputs_q, "query")  # [B, T, N, H]
        if self.rope:
            query = ops.apply_rope(query, positions)
        key, value, spec, new_cache = self._keys_values(
            inputs_q if inputs_kv is None else jnp.asarray(inputs_kv), cache, spec,
            positions if kv_positions is None else kv_positions)
        if position_bias is not None:
            q_pos, k_pos = _attended_positions(spec, positions, kv_positions, key.shape[1])
            extra = position_bias(q_pos, k_pos)  # [b, N, T, S]
            bias = extra if bias is None else bias + extra
        group = batch // key.shape[0]  # query rows per key row: beams sharing cross keys
        if group * key.shape[0] != batch:
            raise ValueError(f"{batch} query rows do not divide into the {key.shape[0]} rows of "
                             "the precomputed keys; precompute them for this batch.")
        query = query.reshape(key.shape[0], group * length, *query.shape[2:])  # [B, G*T, N, H]
        heads, weights = self._attend(query, key, value, mask, bias, spec, dropout_rng,
                                      return_weights, cached=cache is not None)
        heads = heads.reshape(batch, length, *heads.shape[2:])  # [G*B, T, N, H]
        if weights is not None and group > 1:  # [B, N, G*T, S] -> [G*B, N, T, S]
            weights = weights.reshape(-1, weights.shape[1], group, length, weights.shape[-1])
            weights = jnp.swapaxes(weights, 1, 2).reshape(batch, -1, length, weights.shape[-1])
        out = self._output(heads)  # [B, T, D]
        if incremental and not kv_cache.is_ring(cache, spec):  # traced overflow: poison, not wrong
            out = jnp.where(cache["index"] + length > cache["key"].shape[2], jnp.nan, out)
        return out, new_cache, weights

    def _beam_step(self, inputs_q, cache, mask, bias, spec, positions, position_bias,
                   dropout_rng, return_weights):
        """One token per row over a beam cache (module docstring): ``(out [G*B, 1, D],
        new_cache, weights [G*B, N, 1, L*G] or None)``."""
        rows, length = inputs_q.shape[:2]
        max_len = cache["beam_slot"].shape[1]
        batch, beams = cache["key"].shape[0], cache["key"].shape[2] // max_len  # [B, K, L*G, H]
        if length != 1 or rows != batch * beams:
            raise ValueError(f"a beam cache of {batch} x {beams} rows takes [{batch * beams}, "
                             f"1, D] inputs (one token per beam); got {tuple(inputs_q.shape)}.")
        if position_bias is not None or bias is not None or (spec is not None and (
                spec.alibi_slopes is not None or spec.window is not None)) or (
                dropout_rng is not None and self.dropout_rate > 0):
            raise ValueError("a beam cache supports no ALiBi, window, bias or dropout; build "
                             "the decoding cache with beams=1.")
        index = cache["index"]
        if positions is None and self.rope:
            positions = jnp.full((rows, 1), index, jnp.int32)
        query = self._project(inputs_q, "query")  # [G*B, 1, N, H]
        key = self._project(inputs_q, "key")  # [G*B, 1, K, H]
        value = self._project(inputs_q, "value")
        if self.rope:
            query, key = ops.apply_rope(query, positions), ops.apply_rope(key, positions)

        def write(cached, new):  # new [G*B, 1, K, H] -> slots index * G + g of example b
            new = jnp.transpose(new.reshape(batch, beams, *new.shape[2:]), (0, 2, 1, 3))
            return lax.dynamic_update_slice(cached, new.astype(cached.dtype),
                                            (0, 0, index * beams, 0))  # [B, K, G, H]

        cached_k, cached_v = write(cache["key"], key), write(cache["value"], value)
        own = (jnp.arange(rows, dtype=jnp.int32) % beams)[:, None]  # [G*B, 1] each row's slot
        slots = lax.dynamic_update_slice(cache["beam_slot"], own, (0, index))  # [G*B, L]
        seen = slots[:, :, None] == jnp.arange(beams, dtype=jnp.int32)  # [G*B, L, G]
        seen = seen & (jnp.arange(max_len) <= index)[:, None]
        seen = seen.reshape(batch, 1, beams, max_len * beams)  # [B, 1, G, L*G]
        mask = seen if mask is None else mask & seen
        heads, weights = _beam_attention(
            query.reshape(batch, beams, *query.shape[2:]).astype(self.dtype),
            cached_k.astype(self.dtype), cached_v.astype(self.dtype), mask, self.precision)
        out = self._output(heads.reshape(rows, 1, *heads.shape[2:]))  # [G*B, 1, D]
        out = jnp.where(index >= max_len, jnp.nan, out)  # traced overflow: poison, not wrong
        new_cache = {"key": cached_k, "value": cached_v, "index": index + 1, "beam_slot": slots}
        if not return_weights:
            return out, new_cache, None
        # [B, N, G, L*G] -> [G*B, N, 1, L*G]
        return out, new_cache, jnp.swapaxes(weights, 1, 2).reshape(rows, -1, 1, weights.shape[-1])

    def _attend(self, query, key, value, mask, bias, spec, dropout_rng, return_weights, *,
                cached: bool):
        """``ops.dot_product_attention`` with this module's settings: ``(heads [B, T, N, H],
        weights [B, N, T, S] or None)``."""
        impl = self.implementation
        if return_weights or (impl == "splash" and cached):
            impl = "xla"  # splash: no weights; a decode step's few queries gain nothing
        result = ops.dot_product_attention(
            query,
            key.astype(self.dtype),
            value.astype(self.dtype),
            mask=mask,
            bias=bias,
            spec=spec,
            dropout_rate=self.dropout_rate if dropout_rng is not None else 0.0,
            dropout_rng=dropout_rng,
            implementation=impl,
            chunk_size=self.chunk_size,
            precision=self.precision,
            return_weights=return_weights,
        )
        return result if return_weights else (result, None)

    def _keys_values(self, inputs_kv, cache, spec, kv_positions):
        """``(key [B, S, K, H], value [B, S, K, H], spec, new_cache)`` for one call: from a
        precomputed cache as is, else projected from ``inputs_kv`` (rotated for RoPE) and, with
        an incremental cache, written into it."""
        if cache is not None and "index" not in cache:  # precomputed keys/values
            key = jnp.transpose(cache["key"], (0, 3, 1, 2))  # [B, S, K, H]
            return key, kv_cache.swap_heads(cache["value"]), spec, cache
        key = self._project(inputs_kv, "key")  # [B, S, K, H]
        value = self._project(inputs_kv, "value")  # [B, S, K, H]
        if self.rope:
            key = ops.apply_rope(key, kv_positions)
        if cache is None:
            return key, value, spec, None
        kv_cache.check_cache(cache, key)
        if kv_cache.is_ring(cache, spec):
            return kv_cache.update_ring(cache, key, value, spec)
        return kv_cache.update_cache(cache, key, value, spec)


def _beam_attention(query, keys, values, mask, precision):
    """Attention of a beam step in the cache's heads-first layout, so no step copies the
    cache: ``query [B, G, N, H]``, ``keys``/``values`` ``[B, K, S, H]``, ``mask`` bool
    ``[B, 1, G, S]`` -> ``(heads [B, G, N, H], float32 weights [B, N, G, S])``."""
    b, g, n, h = query.shape
    k = keys.shape[1]
    q = jnp.transpose(query.reshape(b, g, k, n // k, h), (0, 2, 3, 1, 4))  # [B, K, N/K, G, H]
    logits = jnp.einsum("bkqh,bksh->bkqs", q.reshape(b, k, -1, h), keys, precision=precision,
                        preferred_element_type=jnp.float32) * (1.0 / math.sqrt(h))
    weights = ops.masked_softmax(logits.reshape(b, k, n // k, g, -1), mask[:, :, None])
    out = jnp.einsum("bkqs,bksh->bkqh", weights.reshape(b, k, n // k * g, -1).astype(
        values.dtype), values, precision=precision)  # [B, K, N/K * G, H]
    out = jnp.transpose(out.reshape(b, k, n // k, g, h), (0, 3, 1, 2, 4)).reshape(b, g, n, h)
    return out.astype(query.dtype), weights.reshape(b, n, g, -1)


def _attended_positions(spec, positions, kv_positions, num_keys: int):
    """``(q_positions [b, T], k_positions [b, S])`` of one call: the cache's (in the spec),
    else the given ones, else indices."""
    q_pos = None if spec is None else spec.q_positions
    k_pos = None if spec is None else spec.k_positions
    q_pos = positions if q_pos is None else q_pos
    if k_pos is None:
        k_pos = kv_positions if kv_positions is not None else positions
    if k_pos is None:
        k_pos = jnp.arange(num_keys, dtype=jnp.int32)[None]
    return q_pos, k_pos
