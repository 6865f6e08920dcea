"""Pure-JAX building blocks of the Transformer: attention, masks, positions, losses, LoRA,
int8 quantisation.

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
from transformer_jax.ops.quantize import (
    QMAX,
    dequantize,
    int8_dot,
    int8_matmul,
    quantize_per_channel,
    quantize_rows,
)

__all__ = [
    "IMPLEMENTATIONS",
    "QMAX",
    "AttentionSpec",
    "FusedLoss",
    "alibi_bias",
    "alibi_slopes",
    "apply_rope",
    "causal_mask",
    "combine_masks",
    "cross_entropy",
    "dequantize",
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
    "int8_dot",
    "int8_matmul",
    "project_qkv",
    "quantize_per_channel",
    "quantize_rows",
    "relative_position_bias",
    "relative_position_buckets",
    "segment_mask",
    "sinusoidal_encoding",
    "token_accuracy",
]
