"""LoRA adapters (Hu et al. 2021) for the projections of any model built here: the module.

``ModelConfig.lora_rank = r > 0`` gives every projection named in ``lora_targets`` (attention
"query", "key", "value", "out"; feed-forward "wi", "wo") a ``LoRA`` module: ``a [D_in, r]``
(random) and ``b [r, D_out]`` (zeros, so the adapted model starts equal to its base), applied
as ``ops.lora_dense(x, w, a, b, alpha / r)`` beside the frozen weight ``w``. Adapter
parameters live under names ending in ``_lora`` (``.../self_attention/query_lora/a``);
everything else is the base (``is_adapter``). Working with the params trees of adapted
models (training only the adapters, saving them, merging them): ``nn.adapters``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from transformer_jax import ops
from transformer_jax.config import ModelConfig

__all__ = ["ADAPTER_SUFFIX", "LoRA", "is_adapter", "make_lora"]

ADAPTER_SUFFIX = "_lora"


class LoRA(nnx.Module):
    """A low-rank adapter ``scale * (x a) b`` of one ``[D_in, D_out]`` weight.

    Args:
      d_in, d_out: the adapted weight's shape (a ``[D, N, H]`` kernel is ``[D, N*H]``).
      rank: r; alpha: the scale is ``alpha / r``.
      param_dtype: dtype of ``a`` and ``b``.
      rngs: ``nnx.Rngs`` (``params`` stream, for ``a``).
    """

    def __init__(self, d_in: int, d_out: int, *, rank: int, alpha: float, param_dtype,
                 rngs: nnx.Rngs):
        self.scale = float(alpha) / rank
        init = jax.nn.initializers.normal(stddev=d_in**-0.5)
        self.a = nnx.Param(init(rngs.params(), (d_in, rank), param_dtype))
        self.b = nnx.Param(jnp.zeros((rank, d_out), param_dtype))

    def __call__(self, x, w) -> jax.Array:
        """``x [..., D_in]`` through the adapted ``w [D_in, D_out]`` -> ``[..., D_out]``."""
        return ops.lora_dense(x, w, self.a[...].astype(x.dtype), self.b[...].astype(x.dtype),
                              self.scale)

    def merge(self, w) -> jax.Array:
        """``w + scale * a b`` in ``w``'s dtype."""
        return ops.lora_merge(w, self.a[...], self.b[...], self.scale)


def make_lora(config: ModelConfig, name: str, d_in: int, d_out: int, rngs: nnx.Rngs):
    """A ``LoRA`` for projection ``name`` when the config targets it, else None."""
    if not config.lora_rank or name not in config.lora_target_names:
        return None
    return LoRA(d_in, d_out, rank=config.lora_rank, alpha=config.lora_alpha,
                param_dtype=config.params_dtype, rngs=rngs)


def is_adapter(path) -> bool:
    """Whether a params-tree path (``jax.tree_util`` keys or strings) is inside an adapter."""
    names = (str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    return any(name.endswith(ADAPTER_SUFFIX) for name in names)


