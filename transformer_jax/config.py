"""Model configuration: one frozen dataclass, presets and validation (the parameter-count
formula is ``transformer_jax.param_count``).

``ModelConfig`` describes every architectural choice of the Transformer (Vaswani et al. 2017)
and of its decoder-only variant. Variants are made with ``dataclasses.replace`` or
``ModelConfig.from_dict``; invalid combinations raise ``ValueError`` at construction with one
sentence saying what is wrong and how to fix it.

Presets (paper, table 3): ``tiny()`` for tests and smoke runs, ``base()`` (65M in the paper;
63.1M here with a 37000-token shared vocabulary) and ``big()``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from transformer_jax.ops import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS

__all__ = [
    "ACTIVATIONS",
    "DTYPES",
    "LORA_TARGETS",
    "ModelConfig",
    "POSITIONAL_KINDS",
    "REMAT_POLICIES",
]

POSITIONAL_KINDS = ("sinusoidal", "sinusoidal_split", "learned", "rope", "alibi", "t5_relative")
# Feed-forward activations by name (``ModelConfig.activation``; ``nn.FeedForward`` applies
# them): "gelu" is the exact (erf) GELU, "gelu_tanh" its tanh approximation, "quick_gelu"
# ``x * sigmoid(1.702 x)``, "silu" = swish.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "relu6": jax.nn.relu6,
}
PRECISIONS = ("default", "high", "highest")
# What a rematerialised layer keeps for the backward pass (``nn.stacks``): "none" = no remat,
# "full" = only the layer's input (everything inside is recomputed), "dots" = also the results
# of the matmuls with the weights (XLA recomputes the rest: softmax, LayerNorm, activations).
REMAT_POLICIES = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16", "float16")
# Projections a LoRA adapter can target (``ModelConfig.lora_targets``): attention query, key,
# value and output, and the feed-forward network's two layers.
LORA_TARGETS = ("query", "key", "value", "out", "wi", "wo")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of an encoder-decoder Transformer (or decoder-only LM).

    Attributes:
      vocab_size: V, size of the (joint) token vocabulary.
      d_model: D, width of the residual stream; must be divisible by ``num_heads``.
      num_heads: N, attention heads; head dim H = D / N.
      num_layers: default number of encoder and decoder layers.
      num_encoder_layers: encoder layers (None -> ``num_layers``).
      num_decoder_layers: decoder layers (None -> ``num_layers``).
      d_ff: F, inner width of the position-wise feed-forward network.
      dropout_rate: residual and embedding dropout ("P_drop" of the paper).
      attention_dropout_rate: dropout on the attention weights.
      max_len: longest sequence the learned position table covers (also an upper bound for
        decode caches built by callers).
      positional: "sinusoidal" (paper: sine and cosine interleaved) | "sinusoidal_split" (the
        same frequencies with all sines in the first half of the features and all cosines in
        the second, as Marian / OPUS-MT models) | "learned" (a [max_len, D] table) | "rope"
        (rotate q/k in self-attention) | "alibi" (linear distance bias in self-attention) |
        "t5_relative" (T5's bucketed relative position bias in self-attention, one learned
        ``[relative_num_buckets, N]`` table per stack shared by its layers: bidirectional in
        the encoder, unidirectional in the decoder).
      pre_norm: False = post-LN as in the paper (LN(x + Sublayer(x))); True = pre-LN
        (x + Sublayer(LN(x))) with a final LayerNorm after the encoder and the decoder stacks.
      share_embeddings: one token table for source and target (paper, section 3.4).
      tie_output: logits = x @ target_embedding^T; False -> a separate D->V Dense layer.
      use_bias: biases in the attention projections, feed-forward and untied output layers
        (LayerNorms always have scale and bias).
      layer_norm_epsilon: LayerNorm epsilon.
      dtype: compute dtype name ("float32" | "bfloat16"; "float16" is refused because it
        needs loss scaling); LayerNorm, softmax and the returned logits are float32 regardless.
      param_dtype: dtype name of the stored parameters.
      attention_impl: "xla" | "chunked" | "jax" | "splash" (TPU; see ``transformer_jax.ops``).
        "splash" trains with Pallas' flash kernel; cached decoding uses "xla".
      attention_chunk_size: query and key block size of "chunked" attention (memory per
        block ``[B, N, C, C]``; see docs/long_sequences.md).
      attention_precision: matmul precision inside attention: "default" (fastest; bf16 passes
        on TPU/GPU tensor cores), "high" or "highest" (full float32).
      pad_id: token id of padding (also the decoder BOS, see ``nn.shift_right``).
      ff_dropout_rate: extra field (not in the paper): dropout on the ReLU activations inside
        the feed-forward network (tensor2tensor's ``relu_dropout``); 0 disables it.
      activation: feed-forward activation, one of ``ACTIVATIONS`` (paper: "relu").
      scale_embedding: multiply token embeddings by sqrt(D) (paper, section 3.4); False adds
        the position encodings to the raw table rows.
      final_logits_bias: add a learned [V] bias to the output logits (Marian's
        ``final_logits_bias``); an untied output layer then has no bias of its own.
      never_predict_pad: decoding searches (``Translator``) never choose ``pad_id``, as
        transformers' ``bad_words_ids=[[pad]]`` for Marian models, whose pad logit is 0 and
        would otherwise win where every real token scores below it. Training is unaffected.
      num_decoder_heads: heads of the decoder's attention layers (None -> ``num_heads``,
        which is then the encoder's only).
      decoder_d_ff: feed-forward width of the decoder layers (None -> ``d_ff``).
      remat: activation rematerialisation of every encoder and decoder layer in training,
        one of ``REMAT_POLICIES``: "none" stores every activation for the backward pass;
        "full" stores only each layer's input and recomputes the layer (about one more
        forward pass of compute, activation memory ~ one layer's); "dots" also keeps the
        matmul results with the weights. Numbers are unchanged; cached decoding never remats.
      num_kv_heads: K, key/value heads of every attention layer (None -> the layer's query
        heads): grouped-query attention, K = 1 multi-query. K divides ``num_heads`` (and
        ``num_decoder_heads``); the KV cache shrinks by N / K.
      local_window_size: sliding-window self-attention (None = full): a query attends at most
        this many earlier positions and itself (the encoder also as many later positions);
        decoding then keeps a cache of ``local_window_size + 1`` positions (a ring buffer).
      relative_num_buckets, relative_max_distance: the buckets of ``positional="t5_relative"``
        (``ops.relative_position_buckets``; T5: 32 and 128).
      lora_rank: r > 0 adds LoRA adapters (``nn.lora``) to the ``lora_targets`` projections
        (comma-separated names from ``LORA_TARGETS``) with scale ``lora_alpha / r``; training
        then updates the adapters only. 0 = no adapters.
    """

    vocab_size: int = 32000
    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 6
    num_encoder_layers: int | None = None
    num_decoder_layers: int | None = None
    d_ff: int = 2048
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    max_len: int = 512
    positional: str = "sinusoidal"
    pre_norm: bool = False
    share_embeddings: bool = True
    tie_output: bool = True
    use_bias: bool = True
    layer_norm_epsilon: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str = "xla"
    attention_chunk_size: int = 512
    attention_precision: str = "default"
    pad_id: int = 0
    ff_dropout_rate: float = 0.0
    activation: str = "relu"
    scale_embedding: bool = True
    final_logits_bias: bool = False
    never_predict_pad: bool = False
    num_decoder_heads: int | None = None
    decoder_d_ff: int | None = None
    remat: str = "none"
    num_kv_heads: int | None = None
    local_window_size: int | None = None
    relative_num_buckets: int = 32
    relative_max_distance: int = 128
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = "query,value"

    def __post_init__(self):
        self._check_sizes()
        self._check_choices()
        self._check_relative()
        self._check_lora()

    def _check_lora(self) -> None:
        """Rank, scale and target names of the LoRA adapters."""
        if not isinstance(self.lora_rank, int) or isinstance(self.lora_rank, bool) or (
                self.lora_rank < 0):
            raise ValueError(f"lora_rank={self.lora_rank!r} must be a non-negative integer "
                             "(0 = no adapters).")
        if not isinstance(self.lora_alpha, int | float) or not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha={self.lora_alpha!r} must be a positive number.")
        unknown = [t for t in self.lora_target_names if t not in LORA_TARGETS]
        if unknown or (self.lora_rank and not self.lora_target_names):
            raise ValueError(f"lora_targets={self.lora_targets!r} must name projections from "
                             f"{LORA_TARGETS}, separated by commas.")

    def _check_relative(self) -> None:
        """The buckets of ``positional="t5_relative"`` and an implementation that takes a bias."""
        if self.positional != "t5_relative":
            return
        if (
                self.relative_num_buckets < 4
                or self.relative_max_distance <= self.relative_num_buckets // 4):
            raise ValueError(
                f"positional='t5_relative' needs relative_num_buckets >= 4 and "
                f"relative_max_distance > relative_num_buckets / 4; got "
                f"{self.relative_num_buckets} and {self.relative_max_distance} (T5: 32 and 128).")
        if self.attention_impl == "splash":
            raise ValueError("attention_impl='splash' takes no bias, so no T5 relative bias; use "
                             "attention_impl='xla', 'chunked' or 'jax'.")

    def _check_sizes(self) -> None:
        """Counts, sizes, rates and the divisibility of d_model by the head counts."""
        positive = ["vocab_size", "d_model", "num_heads", "num_layers", "d_ff", "max_len",
                    "attention_chunk_size", "relative_num_buckets", "relative_max_distance"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        for name in ("num_decoder_heads", "decoder_d_ff", "num_kv_heads", "local_window_size"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value <= 0
            ):
                raise ValueError(f"{name}={value!r} must be a positive integer or None.")
        if self.num_decoder_heads is not None and self.d_model % self.num_decoder_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_decoder_heads="
                f"{self.num_decoder_heads}; choose a head count that divides d_model."
            )
        for heads in (self.num_heads, self.num_decoder_heads):
            if self.num_kv_heads is not None and heads is not None and heads % self.num_kv_heads:
                raise ValueError(
                    f"num_kv_heads={self.num_kv_heads} does not divide the {heads} query heads; "
                    "choose a key/value head count that divides num_heads and num_decoder_heads."
                )
        for name in ("num_encoder_layers", "num_decoder_layers"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 0
            ):
                raise ValueError(
                    f"{name}={value!r} must be a non-negative integer or None (= num_layers)."
                )
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
                "choose num_heads that divides d_model."
            )
        for name in ("dropout_rate", "attention_dropout_rate", "ff_dropout_rate"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name}={value!r} must be in [0, 1).")

    def _check_choices(self) -> None:
        """Named options (positional kind, dtypes, attention, activation) and their limits."""
        if self.positional not in POSITIONAL_KINDS:
            raise ValueError(
                f"positional={self.positional!r} is not supported; use one of {POSITIONAL_KINDS}."
            )
        for name in ("dtype", "param_dtype"):
            value = getattr(self, name)
            if value not in DTYPES:
                raise ValueError(
                    f"{name}={value!r} is not a valid dtype name; use one of {DTYPES}."
                )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) == "float16":
                raise ValueError(
                    f"{name}='float16' needs loss scaling, which this library does not "
                    "implement (small gradients underflow to zero); use 'bfloat16' (same "
                    "memory and speed, float32 range) or 'float32'."
                )
        if self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"attention_impl={self.attention_impl!r} is unknown; use one of "
                f"{ATTENTION_IMPLEMENTATIONS}."
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} is unknown; use one of {REMAT_POLICIES}.")
        if self.attention_precision not in PRECISIONS:
            raise ValueError(
                f"attention_precision={self.attention_precision!r} is unknown; use one of "
                f"{PRECISIONS}."
            )
        if self.attention_impl in ("jax", "splash") and self.attention_dropout_rate > 0:
            raise ValueError(
                f"attention_impl={self.attention_impl!r} does not support attention dropout; "
                "set attention_dropout_rate=0 or use attention_impl='xla' or 'chunked'."
            )
        if self.attention_impl == "splash" and self.positional == "alibi":
            raise ValueError("attention_impl='splash' has no ALiBi bias; use positional="
                             "'rope' or attention_impl='xla' or 'chunked'.")
        if self.decoder_layers < 1:
            raise ValueError(
                f"The decoder needs at least one layer; got num_decoder_layers="
                f"{self.num_decoder_layers} and num_layers={self.num_layers}."
            )
        if self.positional == "rope" and self.head_dim % 2:
            raise ValueError(
                f"positional='rope' needs an even head dim, but d_model={self.d_model} / "
                f"num_heads={self.num_heads} = {self.head_dim}; change d_model or num_heads."
            )
        if (self.positional == "rope" and self.num_decoder_heads
                and (self.d_model // self.num_decoder_heads) % 2):
            raise ValueError(
                f"positional='rope' needs an even decoder head dim, but d_model={self.d_model} "
                f"/ num_decoder_heads={self.num_decoder_heads} is odd; change either."
            )
        if self.positional.startswith("sinusoidal") and self.d_model % 2:
            raise ValueError(
                f"positional={self.positional!r} needs an even d_model; got "
                f"d_model={self.d_model}."
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation={self.activation!r} is unknown; use one of {tuple(ACTIVATIONS)}."
            )
        for name in ("scale_embedding", "final_logits_bias", "never_predict_pad"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False.")
        if not self.layer_norm_epsilon > 0:
            raise ValueError(
                f"layer_norm_epsilon={self.layer_norm_epsilon!r} must be a positive number."
            )
        if not isinstance(self.pad_id, int) or not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(
                f"pad_id={self.pad_id!r} must be a token id in [0, vocab_size={self.vocab_size})."
            )

    # ------------------------------------------------------------------ derived values

    @property
    def uses_dropout(self) -> bool:
        """Whether any dropout rate is non-zero (training then needs dropout keys)."""
        return max(self.dropout_rate, self.attention_dropout_rate, self.ff_dropout_rate) > 0

    @property
    def head_dim(self) -> int:
        """H = d_model / num_heads."""
        return self.d_model // self.num_heads

    @property
    def kv_heads(self) -> int:
        """K, key/value heads of this side's attention (``num_kv_heads`` or ``num_heads``)."""
        return self.num_kv_heads or self.num_heads

    @property
    def lora_target_names(self) -> tuple[str, ...]:
        """``lora_targets`` as a tuple of names."""
        return tuple(t.strip() for t in str(self.lora_targets).split(",") if t.strip())

    @property
    def encoder_layers(self) -> int:
        """Number of encoder layers (``num_encoder_layers`` or ``num_layers``)."""
        return self.num_layers if self.num_encoder_layers is None else self.num_encoder_layers

    @property
    def decoder_layers(self) -> int:
        """Number of decoder layers (``num_decoder_layers`` or ``num_layers``)."""
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

    def decoder_side(self) -> ModelConfig:
        """This config with the decoder's ``num_heads`` and ``d_ff`` (itself when the decoder
        has no sizes of its own)."""
        if self.num_decoder_heads is None and self.decoder_d_ff is None:
            return self
        return dataclasses.replace(
            self, num_heads=self.num_decoder_heads or self.num_heads,
            d_ff=self.decoder_d_ff or self.d_ff, num_decoder_heads=None, decoder_d_ff=None)

    @property
    def compute_dtype(self) -> jnp.dtype:
        """``dtype`` as a jnp dtype."""
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        """``param_dtype`` as a jnp dtype."""
        return jnp.dtype(self.param_dtype)

    # ------------------------------------------------------------------ (de)serialisation

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Builds a config from a mapping (e.g. JSON or ``ml_collections`` ``to_dict()``).

        Raises:
          ValueError: naming the unknown key(s) and listing the valid ones.
        """
        valid = cls.field_names()
        unknown = sorted(str(k) for k in d if k not in valid)
        if unknown:
            raise ValueError(
                f"Unknown ModelConfig key(s) {unknown}; valid keys are {', '.join(valid)}."
            )
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict of all fields (JSON serialisable); inverse of ``from_dict``."""
        return dataclasses.asdict(self)

    def replace(self, **changes) -> ModelConfig:
        """``dataclasses.replace`` with validation of the new values."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets

    @classmethod
    def tiny(cls, vocab_size: int = 64, **overrides) -> ModelConfig:
        """Test-sized model: D 64, N 4, 2+2 layers, F 128, max_len 64."""
        kwargs = dict(
            vocab_size=vocab_size,
            d_model=64,
            num_heads=4,
            num_layers=2,
            d_ff=128,
            dropout_rate=0.1,
            max_len=64,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def base(cls, vocab_size: int = 37000, **overrides) -> ModelConfig:
        """Transformer (base) of the paper: D 512, N 8, 6+6 layers, F 2048, dropout 0.1."""
        kwargs = dict(
            vocab_size=vocab_size,
            d_model=512,
            num_heads=8,
            num_layers=6,
            d_ff=2048,
            dropout_rate=0.1,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def big(cls, vocab_size: int = 37000, **overrides) -> ModelConfig:
        """Transformer (big) of the paper: D 1024, N 16, 6+6 layers, F 4096, dropout 0.3."""
        kwargs = dict(
            vocab_size=vocab_size,
            d_model=1024,
            num_heads=16,
            num_layers=6,
            d_ff=4096,
            dropout_rate=0.3,
        )
        kwargs.update(overrides)
        return cls(**kwargs)
