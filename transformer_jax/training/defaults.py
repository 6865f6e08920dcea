"""The training config: every key with its default, and validation of user configs.

``configs/*.py`` start from :func:`default_config` and override values. A config may leave
keys out (they get the defaults here) but may not add keys: an unknown key is almost always a
typo, so :func:`validate_config` rejects it with the list of valid names.

Top-level keys:

  seed                    PRNG seed for initialisation, dropout and data order
  num_train_steps         optimizer updates to run (each is grad_accum_steps micro-batches)
  batch_size              global rows per micro-batch, summed over devices and processes; a
                          row holds up to data.max_length source and data.max_length target
                          tokens (several packed pairs when data.packing), so one update sees
                          about batch_size * grad_accum_steps * data.max_length tokens a side
  eval_batch_size         rows per evaluation batch (0: batch_size)
  log_every_steps         fetch/log training metrics every this many updates
  eval_every_steps        evaluate every this many updates (0: only at the end)
  checkpoint_every_steps  save every this many updates (always at the end)
  keep_checkpoints        newest checkpoints kept on disk
  parallelism             "auto" | "none" | "pmap" | "shard_map" (data parallel) |
                          "sharded" (jit over a data/fsdp/tensor mesh, see sharding.*)
  model_kind              "encoder_decoder" (translation) | "decoder_only" (a language
                          model of the target side; needs eval_metrics="")
  eval_metrics            comma-separated subset of "bleu,chrf,exact_match" ("" for none)
  eval_num_sentences      eval-split sentences decoded for those metrics (0: none)
  eval_beam_size          1: greedy decoding; > 1: beam search
  eval_length_penalty     beam-search length penalty alpha
  average_last            > 1: at the end, average the last k checkpoints into
                          <workdir>/averaged and report its metrics too
  model.*                 transformer_jax.config.ModelConfig fields (vocab_size comes from
                          the tokenizer)
  data.*                  transformer_jax.data default_data_config()
  optimizer.*             see transformer_jax.training.optim
  distributed.*           multi-process start-up, see transformer_jax.training.distributed
  sharding.*              mesh sizes and logical-axis rules, see transformer_jax.training.sharding
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import ml_collections

from transformer_jax.training.errors import ConfigError

__all__ = [
    "EVAL_METRICS",
    "default_config",
    "default_optimizer_config",
    "parse_metrics",
    "validate_config",
]

EVAL_METRICS = ("bleu", "chrf", "exact_match")
MODEL_KINDS = ("encoder_decoder", "decoder_only")


def default_optimizer_config() -> ml_collections.ConfigDict:
    """Paper optimizer: Adam(0.9, 0.98, 1e-9), rsqrt schedule with 4000 warm-up steps."""
    c = ml_collections.ConfigDict()
    c.name = "adam"  # "adam" | "adamw"
    c.schedule = "paper"  # "paper" | "warmup_rsqrt" | "warmup_cosine" | "constant"
    c.learning_rate = 1.0  # peak rate; for "paper" the factor in front of d_model^-0.5 * ...
    c.warmup_steps = 4000
    c.end_learning_rate = 0.0  # "warmup_cosine" only
    c.b1 = 0.9
    c.b2 = 0.98
    c.eps = 1e-9
    c.weight_decay = 0.0  # "adamw" only; biases and norms are not decayed
    c.clip_norm = 0.0  # global-norm clipping; 0 disables
    c.grad_accum_steps = 1  # micro-batches per update
    c.label_smoothing = 0.1
    return c


def _model_defaults() -> ml_collections.ConfigDict:
    """ModelConfig fields and defaults; ``int | None`` fields become typed placeholders so
    that ``--config.model.num_encoder_layers=2`` can be parsed on the command line."""
    from transformer_jax.config import ModelConfig

    c = ml_collections.ConfigDict()
    defaults = ModelConfig()
    for field in dataclasses.fields(ModelConfig):
        value = getattr(defaults, field.name)
        if value is None:
            value = ml_collections.config_dict.placeholder(int)
        setattr(c, field.name, value)
    return c


def default_config() -> ml_collections.ConfigDict:
    """All training keys with defaults (a tiny model on the built-in numbers task)."""
    from transformer_jax.data.config import default_data_config

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_train_steps = 1000
    c.batch_size = 64
    c.eval_batch_size = 0
    c.log_every_steps = 50
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 3
    c.parallelism = "auto"
    c.model_kind = "encoder_decoder"
    c.eval_metrics = "bleu,chrf,exact_match"
    c.eval_num_sentences = 200
    c.eval_beam_size = 1
    c.eval_length_penalty = 0.6
    c.average_last = 0
    c.model = _model_defaults()
    c.data = default_data_config()
    c.optimizer = default_optimizer_config()
    from transformer_jax.training.distributed import default_distributed_config
    from transformer_jax.training.sharding import default_sharding_config

    c.distributed = default_distributed_config()
    c.sharding = default_sharding_config()
    return c


def parse_metrics(value) -> tuple[str, ...]:
    """``"bleu,chrf"`` or ``("bleu", "chrf")`` -> validated tuple of metric names."""
    if isinstance(value, str):
        names = [v.strip() for v in value.split(",") if v.strip()]
    else:
        names = [str(v).strip() for v in (value or ())]
    for name in names:
        if name not in EVAL_METRICS:
            raise ConfigError(
                f"eval_metrics contains {name!r}; choose from {', '.join(EVAL_METRICS)}."
            )
    return tuple(names)


def _to_dict(config) -> dict:
    if isinstance(config, ml_collections.ConfigDict | ml_collections.FrozenConfigDict):
        return config.to_dict()
    if isinstance(config, Mapping):
        return {k: _to_dict(v) if isinstance(v, Mapping) else v for k, v in config.items()}
    raise ConfigError(f"the config must be a ConfigDict or a dict; got {type(config).__name__}.")


def _merge(defaults: dict, user: dict, prefix: str = "") -> dict:
    out = dict(defaults)
    for key, value in user.items():
        name = f"{prefix}{key}"
        if key not in defaults:
            known = ", ".join(sorted(defaults))
            section = f"{prefix[:-1]} keys" if prefix else "top-level keys"
            raise ConfigError(f"unknown config key {name!r}; the {section} are: {known}.")
        if isinstance(defaults[key], dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key {name!r} must be a section (dict); got {value!r}.")
            out[key] = _merge(defaults[key], dict(value), f"{name}.")
        else:
            out[key] = value
    return out


def _positive(cfg: dict, *keys: str, allow_zero: bool = False) -> None:
    for key in keys:
        value = cfg[key]
        ok = isinstance(value, int) and (value >= 0 if allow_zero else value > 0)
        if not ok:
            want = "an integer >= 0" if allow_zero else "a positive integer"
            raise ConfigError(f"{key}={value!r} must be {want}.")


def _check_scale_keys(merged: dict) -> None:
    """model_kind, distributed.* and sharding.*."""
    from transformer_jax.training.distributed import check_distributed_config
    from transformer_jax.training.sharding import check_sharding_config

    if merged["model_kind"] not in MODEL_KINDS:
        raise ConfigError(
            f"model_kind={merged['model_kind']!r}; choose {' or '.join(MODEL_KINDS)}."
        )
    if merged["model_kind"] == "decoder_only" and parse_metrics(merged["eval_metrics"]):
        raise ConfigError(
            f"eval_metrics={merged['eval_metrics']!r} compares translations, which a "
            "decoder-only language model does not produce; set eval_metrics=''."
        )
    check_distributed_config(merged["distributed"])
    check_sharding_config(merged["sharding"])


def validate_config(config) -> ml_collections.ConfigDict:
    """Fill missing keys with defaults, reject unknown keys and impossible values.

    Returns:
      A new, complete ConfigDict (the input is not modified).

    Raises:
      ConfigError: naming the key and what to change.
    """
    merged = _merge(default_config().to_dict(), _to_dict(config))
    _positive(merged, "num_train_steps", "batch_size", "log_every_steps", "keep_checkpoints")
    _positive(merged, "eval_batch_size", "eval_every_steps", "checkpoint_every_steps",
              "eval_num_sentences", "average_last", allow_zero=True)
    _positive(merged, "eval_beam_size")
    parse_metrics(merged["eval_metrics"])
    if merged["average_last"] > merged["keep_checkpoints"]:
        raise ConfigError(
            f"average_last={merged['average_last']} needs keep_checkpoints >= "
            f"{merged['average_last']} (got {merged['keep_checkpoints']})."
        )
    from transformer_jax.training.parallel import MODES

    if merged["parallelism"] not in (*MODES, "sharded", "auto"):
        raise ConfigError(
            f"parallelism={merged['parallelism']!r}; choose auto, {', '.join(MODES)}, sharded."
        )
    _check_scale_keys(merged)
    opt = merged["optimizer"]
    if not 0.0 <= opt["label_smoothing"] < 1.0:
        raise ConfigError(f"optimizer.label_smoothing={opt['label_smoothing']} must be in [0, 1).")
    if not (isinstance(opt["grad_accum_steps"], int) and opt["grad_accum_steps"] >= 1):
        raise ConfigError(f"optimizer.grad_accum_steps={opt['grad_accum_steps']!r} must be >= 1.")
    data, model = merged["data"], merged["model"]
    if model["max_len"] < data["max_length"]:
        raise ConfigError(
            f"model.max_len={model['max_len']} is shorter than data.max_length="
            f"{data['max_length']}; raise model.max_len or lower data.max_length."
        )
    return ml_collections.ConfigDict(merged)
