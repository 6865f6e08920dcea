"""TPU flash attention: Pallas' splash-attention kernel behind ``dot_product_attention``.

``implementation="splash"`` runs ``jax.experimental.pallas.ops.tpu.splash_attention`` (the
block-sparse flash attention of MaxText) on a TPU: the ``[T, S]`` weights never exist, the
causal mask is static (blocks above the diagonal are skipped), and padding and packed rows
become the kernel's segment ids. On any other platform the same kernel runs in Pallas'
interpreter (exact, slow: for tests), chosen per platform when the program is lowered, so a
program compiled ahead of time for a TPU topology on a CPU holds the real kernel.

What it takes (anything else raises ``ValueError``, use ``"xla"`` or ``"chunked"``):

* masks from ``AttentionSpec`` segments / ``k_valid`` / ``k_lengths``, ``causal`` and
  ``window`` (``dot_product_attention``'s ``is_causal``, ``key_value_seq_lengths`` and
  ``local_window_size`` arrive in the spec); no dense ``mask``, no ``bias``, no ALiBi, no
  dropout;
* causal and sliding-window masks by index (``j <= i``, ``i - left <= j <= i + right``,
  T == S): the kernel's static ``CausalMask`` / ``LocalMask``, whose blocks outside the band
  are skipped. With packed segments the spec's positions are taken to restart at every
  segment and grow by one (as ``data.packing`` makes them), where ``k_pos <= q_pos`` within a
  segment is the same as ``j <= i``;
* fewer key/value heads than query heads (grouped-query attention): the kernel's own.

Under ``jax.jit`` with shardings (``parallelism="sharded"``) XLA cannot split a Pallas kernel
over devices; trace the step inside ``ops.partition.partitioned(mesh, batch_axes, head_axes)``
and each device runs the kernel on its own rows and heads (``shard_map``). Inside ``shard_map`` or
``pmap`` (``parallelism="shard_map"|"pmap"``) nothing is needed.

T and S are padded to a multiple of 128 (padding keys are masked out). Queries are scaled
by ``1/sqrt(H)`` before the kernel, in their own dtype. A query that may attend no key
gets a zero output, as with the other implementations.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from transformer_jax.ops import partition
from transformer_jax.ops.masks import AttentionSpec

__all__ = ["splash_attention"]

BLOCK = 128  # the kernel's sequence tile; T and S are padded to a multiple of it


def _block(length: int) -> int:
    """The largest of 512, 256, 128 that divides ``length`` (a multiple of 128)."""
    return next(b for b in (512, 256, BLOCK) if length % b == 0)


def _segment_ids(spec, b: int, t: int, s: int):
    """``(q_ids [B, T], kv_ids [B, S])`` int32: a key is visible to a query iff the ids are
    equal; padding keys get -1, which no query has."""
    q_ids, kv_ids = jnp.ones((b, t), jnp.int32), jnp.ones((b, s), jnp.int32)
    if spec.q_segments is not None:
        q_ids = jnp.broadcast_to(jnp.asarray(spec.q_segments, jnp.int32), (b, t))
        kv_ids = jnp.broadcast_to(jnp.asarray(spec.k_segments, jnp.int32), (b, s))
        kv_ids = jnp.where(kv_ids == 0, -1, kv_ids)  # segment 0 is padding
    k_valid = spec.arrays(t, s)["k_valid"]  # k_valid and k_lengths together
    if k_valid is not None:
        kv_ids = jnp.where(jnp.broadcast_to(k_valid, (b, s)), kv_ids, -1)
    return q_ids, kv_ids


def _check(spec, mask, bias, t: int, s: int) -> None:
    """Raises unless splash can express the masks."""
    if mask is not None or bias is not None:
        raise ValueError(
            "implementation='splash' takes its masks from `spec`, `is_causal`, "
            "`local_window_size` and `key_value_seq_lengths` only; pass no dense mask or bias, "
            "or use 'xla'/'chunked'.")
    if spec.alibi_slopes is not None:
        raise ValueError("implementation='splash' has no ALiBi bias; use 'xla' or 'chunked'.")
    if not (spec.causal or spec.window is not None):
        return
    if t != s:
        raise ValueError(f"implementation='splash' needs T == S for a causal mask or a sliding "
                         f"window; got T={t}, S={s}.")
    if not spec.by_index and spec.q_segments is None:
        raise ValueError(
            "implementation='splash' masks causally and by window by index (j <= i); "
            "explicit positions without packed segments (e.g. a KV cache) need 'xla'.")


def splash_attention(query, key, value, *, spec=None, mask=None, bias=None):
    """``dot_product_attention`` through the splash kernel (see the module docstring).

    Args:
      query: ``[B, T, N, H]``.
      key, value: ``[B, S, K, H]`` (K divides N).
      spec: optional ``AttentionSpec`` (segments, key padding and lengths, causal, window).
      mask, bias: must be None (here only to give a clear error).

    Returns:
      ``[B, T, N, H]`` in the query dtype.
    """
    b, t, _, _ = query.shape
    s = key.shape[1]
    spec = spec or AttentionSpec()
    _check(spec, mask, bias, t, s)
    q_ids, kv_ids = _segment_ids(spec, b, t, s)
    return _per_device(query, key, value, q_ids, kv_ids, causal=spec.causal, window=spec.window)


def _attend(query, key, value, q_ids, kv_ids, *, causal: bool, window, interpret: bool):
    """One device's rows and heads: ``[B, T, N, H]`` queries, ``[B, S, K, H]`` keys and
    values, ``q_ids [B, T]``, ``kv_ids [B, S]`` -> ``[B, T, N, H]``."""
    b, t, _, h = query.shape
    s = key.shape[1]
    visible = q_ids[:, :, None] == kv_ids[:, None, :]  # [B, T, S] (fused into the reduce)
    i, j = jnp.arange(t)[:, None], jnp.arange(s)[None, :]
    if causal:
        visible &= i >= j
    if window is not None:
        visible &= (i - window[0] <= j) & (j <= i + window[1])
    has_key = jnp.any(visible, axis=-1)  # [B, T]
    # The kernel needs a key in every row (a softmax over nothing divides by 0): a query
    # without one looks at key 0 (visible to every query, causal or not); its output is
    # zeroed below, so no gradient flows from it.
    q_ids = jnp.where(has_key, q_ids, kv_ids[:, :1])

    tp, sp = -(-t // BLOCK) * BLOCK, -(-s // BLOCK) * BLOCK
    q_ids = jnp.concatenate([q_ids, jnp.broadcast_to(kv_ids[:, :1], (b, tp - t))], axis=1)
    kv_ids = jnp.pad(kv_ids, ((0, 0), (0, sp - s)), constant_values=-1)
    scale = jnp.asarray(1.0 / math.sqrt(h), query.dtype)

    def heads_first(x, length):  # [B, L, N, H] -> [B, N, Lp, H], zero-padded
        x = jnp.swapaxes(x, 1, 2)
        return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))

    q, k, v = heads_first(query * scale, tp), heads_first(key, sp), heads_first(value, sp)
    out = _run_kernel(q, k, v, q_ids, kv_ids, causal=causal, window=window, interpret=interpret)
    out = jnp.swapaxes(out[:, :, :t], 1, 2)  # [B, T, N, H]
    return jnp.where(has_key[:, :, None, None], out, jnp.zeros((), out.dtype)).astype(
        query.dtype)


def _per_device(query, key, value, q_ids, kv_ids, *, causal: bool, window):
    """:func:`_attend` on each device's rows and heads under ``partitioned``."""
    def run(*args):
        attend = functools.partial(_attend, causal=causal, window=window)
        return lax.platform_dependent(*args, tpu=functools.partial(attend, interpret=False),
                                      default=functools.partial(attend, interpret=True))

    part = partition.current()
    if part is None:
        return run(query, key, value, q_ids, kv_ids)
    batch_axes = part.divides(query.shape[0], part.batch_axes)  # not split where they do not divide
    head_axes = part.divides(key.shape[2], part.head_axes)  # K | N: query groups go along
    rows = P(batch_axes or None)
    heads = P(batch_axes or None, None, head_axes or None)
    return jax.shard_map(run, mesh=part.mesh, in_specs=(heads, heads, heads, rows, rows),
                         out_specs=heads, check_vma=False)(query, key, value, q_ids, kv_ids)


def _run_kernel(q, k, v, q_ids, kv_ids, *, causal: bool, window, interpret: bool):
    """The splash kernel over ``[B, N, Tp, H]`` queries and ``[B, K, Sp, H]`` keys and values
    (vmapped over the batch)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa  # Pallas: load lazily

    n, tp, sp = q.shape[1], q.shape[2], k.shape[2]
    shape = (tp, sp)
    if window is not None:  # the band; under a causal mask nothing right of the diagonal
        head_mask = sa.LocalMask(shape, (window[0], 0 if causal else window[1]), offset=0)
    else:
        head_mask = sa.CausalMask(shape) if causal else sa.FullMask(shape)
    bq, bk = _block(tp), _block(sp)
    blocks = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                           block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq,
                           block_kv_dq=bk)
    kernel = sa.make_splash_mha(sa.MultiHeadMask([head_mask] * n), block_sizes=blocks,
                                head_shards=1, q_seq_shards=1, interpret=interpret)
    return jax.vmap(lambda q, k, v, qi, ki: kernel(q, k, v, segment_ids=sa.SegmentIds(qi, ki)))(
        q, k, v, q_ids, kv_ids)
