"""The training config: every key with its default, and validation of user configs.

``configs/*.py`` start from :func:`default_config` and override values. A config may leave
keys out (they get the defaults here) but may not add keys: an unknown key is almost always a
typo, so :func:`validate_config` rejects it with the list of valid names.

Top-level keys:

  seed                    PRNG seed for initialisation, dropout and data order
  num_train_steps         optimizer updates to run (each is grad_accum_steps micro-batches)
  max_train_minutes       > 0: stop updating once this many minutes have passed since
                          train.py started (set-up included), checkpoint, and finish as at
                          num_train_steps (final evaluation, averaging); the learning-rate
                          schedule still spans num_train_steps (see fit_steps_to_time).
                          0 (or inf): no time limit
  fit_steps_to_time       True (needs max_train_minutes > 0): at the end of the warm-up,
                          time the updates so far and lower num_train_steps to the updates
                          that fit in the time left, so the learning-rate schedule anneals
                          before the limit on a slow machine instead of being cut short.
                          Fitted once; the checkpoints keep the count (resume uses it) and
                          summary.json reports it. num_train_steps stays the upper bound
  batch_size              global rows per micro-batch, summed over devices and processes; a
                          row holds up to data.max_length source and data.max_length target
                          tokens (several packed pairs when data.packing), so one update sees
                          about batch_size * grad_accum_steps * data.max_length tokens a side
  eval_batch_size         rows per evaluation batch (0: batch_size)
  log_every_steps         fetch/log training metrics every this many updates
  eval_every_steps        evaluate every this many updates (0: only at the end)
  checkpoint_every_steps  save every this many updates (> 0; a checkpoint is always
                          written at the end, so num_train_steps means "only at the end")
  keep_checkpoints        newest checkpoints kept on disk
  parallelism             "auto" | "none" | "pmap" | "shard_map" (data parallel) |
                          "sharded" (jit over a data/fsdp/tensor mesh, see sharding.*);
                          transformer_jax.parallel has a strategy for each
  model_kind              "encoder_decoder" (translation) | "decoder_only" (a language
                          model of the target side; needs eval_metrics="")
  eval_metrics            comma-separated subset of "bleu,chrf,exact_match" ("" for none)
  eval_num_sentences      eval-split sentences decoded for those metrics (0: none)
  eval_beam_size          1: greedy decoding; > 1: beam search
  eval_length_penalty     beam-search length penalty alpha
  average_last            > 1: at the end, average the last k checkpoints into
                          <workdir>/averaged and report its metrics too
  init_from               "" or the work directory of a trained run: a fresh run starts
                          from its newest parameters and its tokenizer (the model must
                          have its architecture; training.init_from)
  model.*                 transformer_jax.config.ModelConfig fields (vocab_size comes from
                          the tokenizer; dtype "float16" is refused: no loss scaling)
  data.*                  transformer_jax.data default_data_config()
  optimizer.*             see transformer_jax.training.optim
  distributed.*           multi-process start-up, see transformer_jax.parallel.processes
  sharding.*              mesh sizes and logical-axis rules, see transformer_jax.parallel.mesh
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import ml_collections

from transformer_jax.config import ModelConfig
from transformer_jax.data.config import check_data_config, default_data_config
from transformer_jax.errors import ConfigError
from transformer_jax.nn import DEFAULT_MODEL_KIND, MODEL_KINDS, model_class
from transformer_jax.parallel import (
    PARALLELISM,
    check_distributed_config,
    check_sharding_config,
    default_distributed_config,
    default_sharding_config,
)
from transformer_jax.training.optim import OPTIMIZERS, SCHEDULES, make_optimizer

__all__ = [
    "EVAL_METRICS",
    "default_config",
    "default_optimizer_config",
    "model_config",
    "parse_metrics",
    "validate_config",
]

EVAL_METRICS = ("bleu", "chrf", "exact_match")
SEED_LIMIT = 2**32  # seeds are unsigned 32-bit (the data order and jax.random.key)


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
    # Positions per chunk of the fused output projection + loss (ops.fused_cross_entropy):
    # only [loss_chunk, V] float32 logits exist at a time; 0 materialises [B, T, V].
    c.loss_chunk = 1024
    return c


def _model_defaults() -> ml_collections.ConfigDict:
    """ModelConfig fields and defaults; ``int | None`` fields become typed placeholders so
    that ``--config.model.num_encoder_layers=2`` can be parsed on the command line."""
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
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_train_steps = 1000
    c.max_train_minutes = 0.0
    c.fit_steps_to_time = False
    c.batch_size = 64
    c.eval_batch_size = 0
    c.log_every_steps = 50
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 3
    c.parallelism = "auto"
    c.model_kind = DEFAULT_MODEL_KIND
    c.eval_metrics = "bleu,chrf,exact_match"
    c.eval_num_sentences = 200
    c.eval_beam_size = 1
    c.eval_length_penalty = 0.6
    c.average_last = 0
    c.init_from = ""
    c.model = _model_defaults()
    c.data = default_data_config()
    c.optimizer = default_optimizer_config()
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
        ok = (isinstance(value, int) and not isinstance(value, bool)
              and (value >= 0 if allow_zero else value > 0))
        if not ok:
            want = "an integer >= 0" if allow_zero else "a positive integer"
            raise ConfigError(f"{key}={value!r} must be {want}.")


def _check_schedule_keys(merged: dict) -> None:
    """Step counts and intervals: training length, logging, evaluation, checkpoints."""
    if merged["checkpoint_every_steps"] == 0:
        raise ConfigError(
            "checkpoint_every_steps=0 is not allowed; a checkpoint is always written at the "
            "end, so set checkpoint_every_steps to num_train_steps to save only there."
        )
    _positive(merged, "num_train_steps", "batch_size", "log_every_steps", "keep_checkpoints",
              "checkpoint_every_steps", "eval_beam_size")
    _positive(merged, "seed", "eval_batch_size", "eval_every_steps", "eval_num_sentences",
              "average_last", allow_zero=True)
    if merged["seed"] >= SEED_LIMIT:
        raise ConfigError(f"seed={merged['seed']} must be below 2**32 ({SEED_LIMIT}); choose a "
                          "seed in [0, 2**32).")
    parse_metrics(merged["eval_metrics"])
    if not isinstance(merged["init_from"], str):
        raise ConfigError(f"init_from={merged['init_from']!r} must be the path of a trained "
                          "work directory, or '' to start from fresh weights.")
    minutes = merged["max_train_minutes"]
    if isinstance(minutes, bool) or not isinstance(minutes, int | float) or not minutes >= 0:
        raise ConfigError(f"max_train_minutes={minutes!r} must be a number of minutes >= 0 "
                          "(0: no time limit).")
    if not isinstance(merged["fit_steps_to_time"], bool):
        raise ConfigError(f"fit_steps_to_time={merged['fit_steps_to_time']!r} must be True "
                          "or False.")
    if merged["fit_steps_to_time"] and not 0 < minutes < math.inf:
        raise ConfigError(f"fit_steps_to_time=True fits the schedule to max_train_minutes, "
                          f"which is {minutes:g}; set a finite max_train_minutes > 0 or "
                          "fit_steps_to_time=False.")
    if merged["average_last"] > merged["keep_checkpoints"]:
        raise ConfigError(
            f"average_last={merged['average_last']} needs keep_checkpoints >= "
            f"{merged['average_last']} (got {merged['keep_checkpoints']})."
        )


def _check_finite(section: dict, prefix: str = "") -> None:
    """No NaN anywhere in the config, and no infinity except max_train_minutes (no limit)."""
    for key, value in section.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _check_finite(value, f"{name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            if name == "max_train_minutes" and value == math.inf:
                continue
            raise ConfigError(f"{name}={value} is not a finite number; give a finite value.")


def _check_scale_keys(merged: dict) -> None:
    """parallelism, model_kind, distributed.* and sharding.*."""
    if merged["parallelism"] not in PARALLELISM:
        raise ConfigError(
            f"parallelism={merged['parallelism']!r}; choose {', '.join(PARALLELISM)}."
        )
    if merged["model_kind"] not in MODEL_KINDS:
        raise ConfigError(
            f"model_kind={merged['model_kind']!r}; choose {' or '.join(MODEL_KINDS)}."
        )
    if parse_metrics(merged["eval_metrics"]) and not model_class(merged["model_kind"]).translates:
        raise ConfigError(
            f"eval_metrics={merged['eval_metrics']!r} compares translations, which a "
            f"{merged['model_kind']} model does not produce; set eval_metrics=''."
        )
    check_distributed_config(merged["distributed"])
    check_sharding_config(merged["sharding"])


def _check_optimizer(merged: dict, d_model: int) -> None:
    """optimizer.*: names, schedule, warm-up, clipping, accumulation, label smoothing."""
    opt = merged["optimizer"]
    if opt["name"] not in OPTIMIZERS:
        raise ConfigError(
            f"optimizer.name={opt['name']!r} is unknown; choose one of {', '.join(OPTIMIZERS)}."
        )
    if opt["schedule"] not in SCHEDULES:
        raise ConfigError(f"optimizer.schedule={opt['schedule']!r} is unknown; choose one of "
                          f"{', '.join(SCHEDULES)}.")
    if not 0.0 <= opt["label_smoothing"] < 1.0:
        raise ConfigError(f"optimizer.label_smoothing={opt['label_smoothing']} must be in [0, 1).")
    chunk = opt["loss_chunk"]
    if not (isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 0):
        raise ConfigError(f"optimizer.loss_chunk={chunk!r} must be 0 (loss from the full "
                          "logits) or a positive number of positions per chunk (e.g. 1024).")
    if opt["name"] == "adam" and opt["weight_decay"]:
        raise ConfigError(f"optimizer.weight_decay={opt['weight_decay']} has no effect with "
                          "optimizer.name='adam'; use optimizer.name='adamw' for weight decay "
                          "or set optimizer.weight_decay=0.")
    if not (isinstance(opt["grad_accum_steps"], int) and opt["grad_accum_steps"] >= 1):
        raise ConfigError(f"optimizer.grad_accum_steps={opt['grad_accum_steps']!r} must be >= 1.")
    try:  # the optimizer's own checks (warm-up vs. steps, clipping), before any disk write
        make_optimizer(ml_collections.ConfigDict(opt), d_model=d_model,
                       num_train_steps=merged["num_train_steps"])
    except (ValueError, TypeError) as err:
        raise ConfigError(" ".join(str(err).split())) from None


def _check_model_and_data(merged: dict) -> ModelConfig:
    """data.* and model.*; the model is built with data.vocab_size (the tokenizer's size
    replaces it once the tokenizer exists)."""
    data = merged["data"]
    try:
        check_data_config(ml_collections.ConfigDict(data))
    except (ValueError, TypeError) as err:
        raise ConfigError(" ".join(str(err).split())) from None
    model = model_config(merged)
    if model.pad_id != 0:
        raise ConfigError(f"model.pad_id={model.pad_id} is not supported for training: the data "
                          "pipeline and the tokenizer pad with id 0; set model.pad_id=0.")
    if model.max_len < data["max_length"]:
        raise ConfigError(
            f"model.max_len={model.max_len} is shorter than data.max_length="
            f"{data['max_length']}; raise model.max_len or lower data.max_length."
        )
    return model


def model_config(config: Mapping, vocab_size: int | None = None) -> ModelConfig:
    """The ``ModelConfig`` of a training config's ``model`` section, with ``vocab_size`` (the
    tokenizer's size; default ``data.vocab_size``); a bad field is a ConfigError."""
    fields = dict(config["model"])
    fields["vocab_size"] = int(vocab_size or config["data"]["vocab_size"])
    try:
        return ModelConfig.from_dict(fields)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model config: {err}") from None


def validate_config(config) -> ml_collections.ConfigDict:
    """The one check of a training config, run before anything is written to disk.

    Fills missing keys with defaults, rejects unknown keys, and checks every section: step
    counts and intervals, parallelism/distributed/sharding, the optimizer (by building it),
    the data keys and the model (by building its ``ModelConfig``).

    Returns:
      A new, complete ConfigDict (the input is not modified).

    Raises:
      ConfigError: one sentence naming the key and what to change.
    """
    merged = _merge(default_config().to_dict(), _to_dict(config))
    _check_finite(merged)
    _check_schedule_keys(merged)
    _check_scale_keys(merged)
    model = _check_model_and_data(merged)
    _check_optimizer(merged, model.d_model)
    return ml_collections.ConfigDict(merged)
