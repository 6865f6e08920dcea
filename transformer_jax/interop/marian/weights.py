"""Marian (Hugging Face ``MarianMTModel``) configs and weights <-> ``ModelConfig`` and params.

Pure conversions on plain dicts and numpy arrays; no file access, no torch. Names follow
transformers' state dict with the ``model.`` prefix removed, e.g.
``encoder.layers.0.self_attn.q_proj.weight`` (a torch ``Linear`` weight is ``[out, in]``).

Layouts: ``q/k/v_proj.weight [N*H, D]`` -> ours ``[D, N, H]``; ``out_proj.weight [D, N*H]`` ->
``[N, H, D]``; ``fc1.weight [F, D]`` -> ``wi.kernel [D, F]``; ``lm_head.weight [V, D]`` ->
``dense.kernel [D, V]``; ``final_logits_bias [1, V]`` -> ``logits_bias [V]``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from transformer_jax.config import ModelConfig

__all__ = ["ConversionError", "hf_config_from_model", "model_config_from_hf",
           "params_from_state_dict", "prune_like", "state_dict_from_params",
           "tables_shared"]

# transformers' ACT2FN names -> ModelConfig.activation
_ACTIVATIONS = {
    "relu": "relu", "gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_accurate": "gelu_tanh",
    "quick_gelu": "quick_gelu", "swish": "silu", "silu": "silu", "tanh": "tanh",
    "sigmoid": "sigmoid", "mish": "mish", "relu6": "relu6",
}
_TO_HF_ACTIVATION = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new",
                     "quick_gelu": "quick_gelu", "silu": "swish", "tanh": "tanh",
                     "sigmoid": "sigmoid", "mish": "mish", "relu6": "relu6"}
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, used by every Marian LayerNorm


class ConversionError(ValueError):
    """A Marian model or work directory that cannot be converted (one sentence)."""


def model_config_from_hf(hf: Mapping) -> ModelConfig:
    """``ModelConfig`` that computes what ``MarianMTModel(MarianConfig(**hf))`` computes."""
    if hf.get("model_type", "marian") != "marian":
        raise ConversionError(
            f"config.json has model_type={hf.get('model_type')!r}; only Marian (model_type "
            "'marian', e.g. Helsinki-NLP/opus-mt-*) models can be converted."
        )
    # transformers' Marian is post-LN whatever ``normalize_before`` says; so is the conversion.
    vocab = int(hf.get("vocab_size", 58101))
    if hf.get("decoder_vocab_size") not in (None, vocab):
        raise ConversionError(
            f"decoder_vocab_size={hf['decoder_vocab_size']} differs from vocab_size={vocab}; "
            "only models with one vocabulary size can be converted."
        )
    activation = hf.get("activation_function", "gelu")
    if activation not in _ACTIVATIONS:
        raise ConversionError(
            f"activation_function={activation!r} is not supported; supported: "
            f"{', '.join(sorted(_ACTIVATIONS))}."
        )
    heads, d_ff = int(hf.get("encoder_attention_heads", 16)), int(hf.get("encoder_ffn_dim", 4096))
    dec_heads = int(hf.get("decoder_attention_heads", heads))
    dec_d_ff = int(hf.get("decoder_ffn_dim", d_ff))
    share = bool(hf.get("share_encoder_decoder_embeddings", True))
    try:
        return ModelConfig(
            vocab_size=vocab,
            d_model=int(hf.get("d_model", 1024)),
            num_heads=heads,
            num_decoder_heads=None if dec_heads == heads else dec_heads,
            num_layers=int(hf.get("encoder_layers", 12)),
            num_encoder_layers=int(hf.get("encoder_layers", 12)),
            num_decoder_layers=int(hf.get("decoder_layers", 12)),
            d_ff=d_ff,
            decoder_d_ff=None if dec_d_ff == d_ff else dec_d_ff,
            dropout_rate=float(hf.get("dropout", 0.1)),
            attention_dropout_rate=float(hf.get("attention_dropout", 0.0)),
            ff_dropout_rate=float(hf.get("activation_dropout", 0.0)),
            max_len=int(hf.get("max_position_embeddings", 1024)),
            positional="sinusoidal_split",
            pre_norm=False,
            share_embeddings=share,
            tie_output=bool(hf.get("tie_word_embeddings", True)),
            use_bias=True,
            layer_norm_epsilon=LAYER_NORM_EPS,
            pad_id=int(hf.get("pad_token_id", vocab - 1)),
            activation=_ACTIVATIONS[activation],
            scale_embedding=bool(hf.get("scale_embedding", False)),
            final_logits_bias=True,
            never_predict_pad=True,
        )
    except (TypeError, ValueError) as err:
        raise ConversionError(
            f"the Marian config cannot be expressed as a ModelConfig: {err}") from None


def hf_config_from_model(config: ModelConfig, base: Mapping | None = None) -> dict:
    """transformers ``MarianConfig`` fields for ``config`` (other keys of ``base`` are kept)."""
    _check_marian_like(config)
    out = dict(base or {})
    out.update(
        model_type="marian", architectures=["MarianMTModel"],
        vocab_size=config.vocab_size, decoder_vocab_size=config.vocab_size,
        d_model=config.d_model, max_position_embeddings=config.max_len,
        encoder_layers=config.encoder_layers, decoder_layers=config.decoder_layers,
        encoder_attention_heads=config.num_heads,
        decoder_attention_heads=config.decoder_side().num_heads,
        encoder_ffn_dim=config.d_ff, decoder_ffn_dim=config.decoder_side().d_ff,
        activation_function=_TO_HF_ACTIVATION[config.activation],
        dropout=config.dropout_rate, attention_dropout=config.attention_dropout_rate,
        activation_dropout=config.ff_dropout_rate, scale_embedding=config.scale_embedding,
        share_encoder_decoder_embeddings=config.share_embeddings,
        tie_word_embeddings=config.tie_output, pad_token_id=config.pad_id,
    )
    out.setdefault("decoder_start_token_id", config.pad_id)
    out.setdefault("eos_token_id", 0)
    out.setdefault("forced_eos_token_id", out["eos_token_id"])
    return out


def _check_marian_like(config: ModelConfig) -> None:
    wanted = dict(positional="sinusoidal_split", pre_norm=False, use_bias=True,
                  final_logits_bias=True)
    for key, value in wanted.items():
        if getattr(config, key) != value:
            raise ConversionError(
                f"the model has {key}={getattr(config, key)!r} but a Marian model needs "
                f"{key}={value!r}; only models imported from Marian can be exported."
            )


# ----------------------------------------------------------------------------- weights
def _linear_in(w, b, n, h):
    """torch q/k/v Linear -> ([D, N, H], [N, H])."""
    return w.T.reshape(-1, n, h), b.reshape(n, h)


def _layer_names(prefix: str, cross: bool) -> dict[tuple, tuple[str, str]]:
    """Our sublayer path -> (HF module, kind); kind in attn | norm | fc."""
    names = {("self_attention",): (f"{prefix}.self_attn", "attn"),
             ("self_residual", "norm", "norm"): (f"{prefix}.self_attn_layer_norm", "norm"),
             ("feed_forward", "wi"): (f"{prefix}.fc1", "fc"),
             ("feed_forward", "wo"): (f"{prefix}.fc2", "fc"),
             ("ff_residual", "norm", "norm"): (f"{prefix}.final_layer_norm", "norm")}
    if cross:
        names[("cross_attention",)] = (f"{prefix}.encoder_attn", "attn")
        names[("cross_residual", "norm", "norm")] = (f"{prefix}.encoder_attn_layer_norm", "norm")
    return names


def _layers(config: ModelConfig):
    """``(our layer path, HF prefix, has cross-attention)`` for every layer."""
    for i in range(config.encoder_layers):
        yield ("encoder", "layers", i), f"encoder.layers.{i}", False
    for i in range(config.decoder_layers):
        yield ("decoder", "layers", i), f"decoder.layers.{i}", True


def _get(state: Mapping, name: str) -> np.ndarray:
    if name not in state:
        raise ConversionError(f"the checkpoint has no tensor {name!r}; is it a Marian model?")
    return np.asarray(state[name], np.float32)


def _table(state: Mapping, side: str) -> np.ndarray:
    """The token table the ``side`` stack uses: its own when written, else the shared one."""
    own = f"{side}.embed_tokens.weight"
    return _get(state, own if own in state else "shared.weight")


def tables_shared(state: Mapping) -> bool:
    """Whether encoder and decoder look tokens up in equal tables. (transformers unties them
    when ``tie_word_embeddings`` is False, even with ``share_encoder_decoder_embeddings``.)"""
    return np.array_equal(_table(state, "encoder"), _table(state, "decoder"))


def params_from_state_dict(state: Mapping[str, np.ndarray], config: ModelConfig) -> dict:
    """Our params from a Marian state dict (``model.`` prefix removed; missing tied tensors
    are taken from their source). Both stacks get a token table; with shared embeddings keep
    the one that ``nnx.to_pure_dict`` of ``Transformer(config)`` has (see ``prune_like``)."""
    params: dict = {"encoder": {"layers": {}}, "decoder": {"layers": {}}}
    for side in ("encoder", "decoder"):
        table = _table(state, side)
        params[side]["embedding"] = {"tokens": {"embed": {"embedding": table}}}
    for path, prefix, cross in _layers(config):
        side = config.decoder_side() if cross else config
        n, h = side.num_heads, side.head_dim
        layer = params[path[0]]["layers"].setdefault(path[2], {})
        for ours, (hf, kind) in _layer_names(prefix, cross).items():
            if kind == "norm":
                leaf = {"scale": _get(state, f"{hf}.weight"), "bias": _get(state, f"{hf}.bias")}
            elif kind == "fc":
                leaf = {"kernel": _get(state, f"{hf}.weight").T, "bias": _get(state, f"{hf}.bias")}
            else:
                leaf = {}
                for name, proj in (("query", "q"), ("key", "k"), ("value", "v")):
                    pw, pb = _get(state, f"{hf}.{proj}_proj.weight"), _get(
                        state, f"{hf}.{proj}_proj.bias")
                    leaf[name], leaf[f"{name}_bias"] = _linear_in(pw, pb, n, h)
                leaf["out"] = _get(state, f"{hf}.out_proj.weight").T.reshape(n, h, -1)
                leaf["out_bias"] = _get(state, f"{hf}.out_proj.bias")
            _put(layer, ours, leaf)
    bias = (_get(state, "final_logits_bias").reshape(-1) if "final_logits_bias" in state
            else np.zeros((config.vocab_size,), np.float32))  # transformers' initial value
    output = {"logits_bias": bias}
    if not config.tie_output:
        output["dense"] = {"kernel": _get(state, "lm_head.weight").T}
    params["decoder"]["output"] = output
    return params


def prune_like(tree: Mapping, like: Mapping) -> dict:
    """``tree`` restricted to the keys of ``like`` (nested); raises on a missing key."""
    out = {}
    for key, sub in like.items():
        if key not in tree:
            raise ConversionError(f"the converted weights lack {key!r}; this is a bug.")
        out[key] = prune_like(tree[key], sub) if isinstance(sub, Mapping) else tree[key]
    return out


def _put(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _at(tree: Mapping, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def _token_table(params: Mapping, side: str) -> np.ndarray:
    """The ``side`` token table; a shared table is stored once, under either stack."""
    other = "decoder" if side == "encoder" else "encoder"
    stack = params[side] if "embedding" in params[side] else params[other]
    return np.asarray(stack["embedding"]["tokens"]["embed"]["embedding"])


def state_dict_from_params(params: Mapping, config: ModelConfig) -> dict[str, np.ndarray]:
    """Marian state dict (with the ``model.`` prefix, float32, every tied copy written out)
    from our params; the inverse of :func:`params_from_state_dict`."""
    _check_marian_like(config)
    d = config.d_model
    out: dict[str, np.ndarray] = {}
    enc_table, dec_table = _token_table(params, "encoder"), _token_table(params, "decoder")
    if config.share_embeddings:
        out["model.shared.weight"] = enc_table
    out["model.encoder.embed_tokens.weight"] = enc_table
    out["model.decoder.embed_tokens.weight"] = dec_table
    for path, prefix, cross in _layers(config):
        layer = _at(params, path)
        for ours, (hf, kind) in _layer_names(prefix, cross).items():
            leaf = _at(layer, ours)
            hf = f"model.{hf}"
            if kind == "norm":
                out[f"{hf}.weight"], out[f"{hf}.bias"] = leaf["scale"], leaf["bias"]
            elif kind == "fc":
                out[f"{hf}.weight"] = np.asarray(leaf["kernel"]).T
                out[f"{hf}.bias"] = leaf["bias"]
            else:
                for name, proj in (("query", "q"), ("key", "k"), ("value", "v")):
                    out[f"{hf}.{proj}_proj.weight"] = np.asarray(leaf[name]).reshape(d, -1).T
                    out[f"{hf}.{proj}_proj.bias"] = np.asarray(leaf[f"{name}_bias"]).reshape(-1)
                out[f"{hf}.out_proj.weight"] = np.asarray(leaf["out"]).reshape(-1, d).T
                out[f"{hf}.out_proj.bias"] = leaf["out_bias"]
    output = params["decoder"]["output"]
    out["lm_head.weight"] = (dec_table if config.tie_output
                             else np.asarray(output["dense"]["kernel"]).T)
    out["final_logits_bias"] = np.asarray(output["logits_bias"]).reshape(1, -1)
    return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in out.items()}
