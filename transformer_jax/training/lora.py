"""Training only the LoRA adapters of a model (``ModelConfig.lora_rank > 0``).

The optimizer keeps state for the adapters alone (``optax.multi_transform``: the inner
optimizer for "adapter" leaves, ``optax.set_to_zero`` for the frozen base), and the model
definition stops gradients at the base weights, so the backward pass computes no base weight
gradient either (``nn.adapters.train_adapters_only``).
"""

from __future__ import annotations

import optax

from transformer_jax.nn import ModelDef
from transformer_jax.nn.adapters import adapter_labels, train_adapters_only

__all__ = ["adapter_optimizer", "for_adapters"]


def adapter_optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` on the adapter leaves; the base leaves get zero updates and no state."""
    return optax.multi_transform({"adapter": tx, "frozen": optax.set_to_zero()}, adapter_labels)


def for_adapters(lora_rank: int, model_def: ModelDef, tx: optax.GradientTransformation):
    """``(model_def, tx)`` of a run: adapter-only training when ``lora_rank > 0``, else as
    given."""
    if not lora_rank:
        return model_def, tx
    return train_adapters_only(model_def), adapter_optimizer(tx)
