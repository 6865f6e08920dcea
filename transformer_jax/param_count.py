"""``count_params(config)``: the number of parameters of a model built from a ``ModelConfig``,
by formula (the tests check it against built models' pytrees)."""

from __future__ import annotations

from transformer_jax.config import ModelConfig

__all__ = ["count_params"]

def _attention_params(d: int, n: int, k: int, bias: bool) -> int:
    """Query and output ``D x D``, key and value ``D x K*H`` (+ biases) with H = D / N."""
    kv = k * (d // n)
    return 2 * d * d + 2 * d * kv + ((2 * d + 2 * kv) if bias else 0)


def _lora_params(config: ModelConfig, d: int, n: int, k: int, f: int) -> tuple[int, int]:
    """LoRA adapter parameters ``(per attention block, per feed-forward)``: ``r (D_in + D_out)``
    for each targeted projection (query / out ``D x D``, key / value ``D x K*H``, wi / wo
    ``D x F``)."""
    r, names, kv = config.lora_rank, config.lora_target_names, k * (d // n)
    if not r:
        return 0, 0
    sizes = {"query": 2 * d, "key": d + kv, "value": d + kv, "out": 2 * d, "wi": d + f,
             "wo": d + f}
    attention = r * sum(sizes[t] for t in names if t in ("query", "key", "value", "out"))
    return attention, r * sum(sizes[t] for t in names if t in ("wi", "wo"))


def count_params(config: ModelConfig, *, decoder_only: bool = False,
                 trainable: bool = False) -> int:
    """Number of parameters of ``nn.Transformer(config)`` (or ``nn.DecoderOnlyLM``), by formula.

    With ``lora_rank > 0`` the count includes the LoRA adapters (``r (D_in + D_out)`` per
    targeted projection, in every attention block and feed-forward network);
    ``trainable=True`` counts what training updates: the adapters alone when
    ``lora_rank > 0`` (the base is frozen), else every parameter.

    Counts: token embeddings (one table when shared, else source + target; one for a
    decoder-only LM), a learned [max_len, D] position table per stack when
    ``positional == "learned"`` (a ``[relative_num_buckets, N]`` table for "t5_relative"),
    per attention block 2 D*D + 2 D*K*H weights (+ 2 D + 2 K*H biases; 4 D*D without
    grouped-query heads), per feed-forward 2 D*F (+ F + D biases), 2 D per LayerNorm (2 per
    encoder layer, 3 per decoder layer, 2 per decoder-only layer, + one final LayerNorm per
    stack when ``pre_norm``), and the untied output layer D*V (+ V bias, unless
    ``final_logits_bias``), and V for ``final_logits_bias``.
    """
    if trainable and config.lora_rank:
        return (count_params(config, decoder_only=decoder_only)
                - count_params(config.replace(lora_rank=0), decoder_only=decoder_only))
    d, f, v = config.d_model, config.d_ff, config.vocab_size
    bias = config.use_bias
    dec = config.decoder_side()
    lora_attention, lora_ffn = _lora_params(config, d, config.num_heads, config.kv_heads, f)
    dec_lora_attention, dec_lora_ffn = _lora_params(config, d, dec.num_heads, dec.kv_heads,
                                                    dec.d_ff)
    attention = _attention_params(d, config.num_heads, config.kv_heads, bias) + lora_attention
    dec_attention = _attention_params(d, dec.num_heads, dec.kv_heads, bias) + dec_lora_attention
    ffn = 2 * d * f + ((f + d) if bias else 0) + lora_ffn
    norm = 2 * d
    table = config.max_len * d if config.positional == "learned" else 0
    relative = config.positional == "t5_relative"
    enc_table = table + (config.relative_num_buckets * config.num_heads if relative else 0)
    dec_table = table + (config.relative_num_buckets * dec.num_heads if relative else 0)
    output = 0 if config.tie_output else d * v + (v if bias else 0)
    if config.final_logits_bias:
        output += v - (v if bias and not config.tie_output else 0)
    final_norm = norm if config.pre_norm else 0

    dec_ffn = 2 * d * dec.d_ff + ((dec.d_ff + d) if bias else 0) + dec_lora_ffn
    if decoder_only:
        layer = dec_attention + dec_ffn + 2 * norm
        return v * d + dec_table + config.decoder_layers * layer + final_norm + output

    encoder_layer = attention + ffn + 2 * norm
    decoder_layer_cross = 2 * dec_attention + dec_ffn + 3 * norm
    embeddings = v * d if config.share_embeddings else 2 * v * d
    encoder = enc_table + config.encoder_layers * encoder_layer + final_norm
    decoder = dec_table + config.decoder_layers * decoder_layer_cross + final_norm
    return embeddings + encoder + decoder + output
