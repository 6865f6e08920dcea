"""Every configs/*.py loads and validates (no data, no training), and the paper recipes hold."""

import glob
import importlib.util
import os

import pytest

from transformer_jax.config import ModelConfig
from transformer_jax.errors import ConfigError
from transformer_jax.param_count import count_params
from transformer_jax.training import validate_config
from transformer_jax.training.optim import make_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# finetune_marian.py takes an imported work directory (tests/interop/test_marian_workdir.py).
CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                      if not p.endswith("finetune_marian.py"))


def _load(name: str):
    path = os.path.join(ROOT, "configs", name)
    spec = importlib.util.spec_from_file_location(f"config_{name[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return validate_config(module.get_config())


def _model(config) -> ModelConfig:
    model = config.model.to_dict()
    model["vocab_size"] = config.data.vocab_size
    return ModelConfig.from_dict(model)


def test_the_expected_configs_exist():
    names = {os.path.basename(p) for p in CONFIG_FILES}
    assert {"default.py", "multi30k.py", "wmt14_ende_base.py", "wmt14_ende_big.py"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_loads_and_validates(path):
    config = _load(os.path.basename(path))
    assert config.num_train_steps > 0
    assert config.batch_size > 0
    _model(config)  # the model part builds a valid ModelConfig
    if config.average_last > 1:
        assert config.keep_checkpoints >= config.average_last


def test_multi30k_config():
    c = _load("multi30k.py")
    d = c.data
    assert (d.source, d.path) == ("text", "../shared/data/multi30k")
    assert (d.source_lang, d.target_lang) == ("en", "de")
    assert (d.train_split, d.eval_split, d.test_split) == ("train", "val", "test2016")
    assert set(c.eval_metrics.split(",")) == {"bleu", "chrf"}
    assert c.eval_beam_size == 4
    params = count_params(_model(c))
    assert 1e6 < params < 5e6, params  # small: ~24 epochs in an hour on a 2-core Zen 4 VM


@pytest.mark.parametrize("name, d_model, heads, d_ff, dropout, steps, average", [
    ("wmt14_ende_base.py", 512, 8, 2048, 0.1, 100_000, 5),
    ("wmt14_ende_big.py", 1024, 16, 4096, 0.3, 300_000, 20),
])
def test_wmt14_configs_follow_the_paper(name, d_model, heads, d_ff, dropout, steps, average):
    c = _load(name)
    m, o, d = c.model, c.optimizer, c.data
    assert (m.d_model, m.num_heads, m.num_layers, m.d_ff) == (d_model, heads, 6, d_ff)
    assert m.dropout_rate == dropout and not m.pre_norm and m.positional == "sinusoidal"
    assert m.share_embeddings and m.tie_output
    assert (d.source, d.tfds_name, d.source_lang, d.target_lang) == (
        "tfds", "wmt14_translate/de-en", "en", "de")
    assert (d.vocab_size, d.tokenizer_model_type) == (37_000, "bpe")
    assert (o.name, o.b1, o.b2, o.eps) == ("adam", 0.9, 0.98, 1e-9)
    assert (o.schedule, o.learning_rate, o.warmup_steps, o.label_smoothing) == (
        "paper", 1.0, 4000, 0.1)
    assert c.num_train_steps == steps and c.average_last == average
    assert (c.eval_beam_size, c.eval_length_penalty) == (4, 0.6)
    # ~25k source and ~25k target token slots per update.
    slots = c.batch_size * o.grad_accum_steps * d.max_length
    assert 23_000 <= slots <= 27_000, slots
    # lr = D^-0.5 * min(step^-0.5, step * 4000^-1.5), step counted from 1
    schedule = make_schedule(o, d_model=m.d_model, num_train_steps=c.num_train_steps)
    for step in (1, 4000, 50_000):
        want = d_model**-0.5 * min(step**-0.5, step * 4000**-1.5)
        assert float(schedule(step - 1)) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("overrides, match", [
    ({"optimizer": {"name": "sgd"}}, r"optimizer.name='sgd' is unknown; choose one of adam"),
    ({"optimizer": {"schedule": "linear"}}, r"optimizer.schedule='linear' is unknown"),
    ({"num_train_steps": 100, "optimizer": {"schedule": "warmup_cosine", "warmup_steps": 100}},
     r"num_train_steps \(100\) > warmup_steps \(100\)"),
    ({"optimizer": {"clip_norm": -1.0}}, r"clip_norm must be >= 0"),
    ({"checkpoint_every_steps": 0}, r"checkpoint_every_steps=0 is not allowed.*num_train_steps"),
    ({"log_every_steps": 0}, r"log_every_steps=0 must be a positive integer"),
    ({"eval_every_steps": -1}, r"eval_every_steps=-1 must be an integer >= 0"),
    ({"parallelism": "tpu"}, r"parallelism='tpu'; choose auto, none, pmap, shard_map, sharded"),
    ({"model_kind": "encoder"}, r"model_kind='encoder'; choose encoder_decoder or decoder_only"),
    ({"data": {"source": "web"}}, r"data.source='web' must be one of"),
    ({"data": {"max_length": 1}}, r"data.max_length=1 must be at least 2"),
    ({"model": {"d_model": 30, "num_heads": 4}}, r"model config: d_model=30 is not divisible"),
    ({"model": {"dtype": "float16"}}, r"model config: dtype='float16' needs loss scaling"),
    ({"distributed": {"coordinator_address": "host"}}, r"needs a port"),
    ({"model": {"pad_id": 3}}, r"model.pad_id=3 is not supported for training"),
    ({"seed": 2**32}, r"seed=4294967296 must be below 2\*\*32"),
    ({"seed": -1}, r"seed=-1 must be an integer >= 0"),
    ({"max_train_minutes": float("inf"), "fit_steps_to_time": True},
     r"max_train_minutes, which is inf; set a finite max_train_minutes"),
    ({"optimizer": {"learning_rate": float("nan")}},
     r"optimizer.learning_rate=nan is not a finite number"),
    ({"data": {"subword_sampling_alpha": float("-inf")}},
     r"data.subword_sampling_alpha=-inf is not a finite number"),
    ({"eval_length_penalty": float("inf")}, r"eval_length_penalty=inf is not a finite number"),
    ({"max_train_minutes": float("nan")}, r"max_train_minutes=nan is not a finite number"),
    ({"optimizer": {"weight_decay": 0.01}}, r"use optimizer.name='adamw' for weight decay"),
])
def test_validate_config_checks_every_section(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(overrides)


def test_validate_config_accepts_edge_values():
    """The largest seed, an unlimited time limit and adamw's decay are fine."""
    validate_config({"seed": 2**32 - 1, "max_train_minutes": float("inf")})
    validate_config({"optimizer": {"name": "adamw", "weight_decay": 0.01}})


def test_validate_config_accepts_the_defaults_and_fills_them_in():
    config = validate_config({"num_train_steps": 7})
    assert config.num_train_steps == 7 and config.optimizer.name == "adam"
    assert config.checkpoint_every_steps > 0
