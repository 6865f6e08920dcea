"""Pure-JAX building blocks of the Transformer: attention, masks, positions, losses, LoRA.

No Flax here; every function works under ``jax.jit``, ``jax.vmap`` and ``jax.grad``.
"""

from transformer_jax.ops.attention import IMPLEMENTATIONS, dot_product_attention, masked_softmax
from transformer_jax.ops.dropout import dropout, keep_mask, keep_scale
from transformer_jax.ops.fused_loss import FusedLoss, fused_cross_entropy
from transformer_jax.ops.lora import lora_dense, lora_merge
from transformer_jax.ops.losses import cross_entropy, token_accuracy
from transformer_jax.ops.masks import (
    AttentionSpec,
    causal_mask,
    combine_masks,
    padding_mask,
    segment_mask,
)
from transformer_jax.ops.multi_head import (
    inert_key_bias,
    multi_head_attention,
    project_out,
    project_qkv,
)
from transformer_jax.ops.positional import (
    alibi_bias,
    alibi_slopes,
    apply_rope,
    relative_position_bias,
    relative_position_buckets,
    sinusoidal_encoding,
)

__all__ = [
    "IMPLEMENTATIONS",
    "AttentionSpec",
    "FusedLoss",
    "alibi_bias",
    "alibi_slopes",
    "apply_rope",
    "causal_mask",
    "combine_masks",
    "cross_entropy",
    "dot_product_attention",
    "dropout",
    "fused_cross_entropy",
    "keep_mask",
    "keep_scale",
    "lora_dense",
    "lora_merge",
    "masked_softmax",
    "multi_head_attention",
    "padding_mask",
    "project_out",
    "inert_key_bias",
    "project_qkv",
    "relative_position_bias",
    "relative_position_buckets",
    "segment_mask",
    "sinusoidal_encoding",
    "token_accuracy",
]
