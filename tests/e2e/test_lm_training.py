"""configs/lm_numbers.py end to end: sharded LM training, checkpoint, generation."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from transformer_jax.checkpoints import load_params, read_meta
from transformer_jax.config import ModelConfig
from transformer_jax.data import Tokenizer
from transformer_jax.inference import Generator, load, make_generate_fn
from transformer_jax.nn import DecoderOnlyLM, split_model
from transformer_jax.training import train_and_evaluate

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "lm_numbers.py")


def _lm_config():
    spec = importlib.util.spec_from_file_location("lm_numbers", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.num_train_steps, c.log_every_steps, c.checkpoint_every_steps = 8, 4, 8
    c.eval_every_steps, c.batch_size = 0, 8
    c.data.update(dict(numbers_train_size=400, numbers_validation_size=16,
                       numbers_test_size=16, vocab_size=96, max_length=24, prefetch_batches=0))
    c.model.update(dict(d_model=32, num_heads=2, num_layers=1, d_ff=64, max_len=48))
    c.optimizer.update(dict(schedule="constant", learning_rate=1e-2))
    c.parallelism = "sharded"
    c.sharding.update(dict(data=2, fsdp=2, tensor=2))
    return c


def test_sharded_lm_run_trains_saves_and_generates(tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 virtual CPU devices)")
    summary = train_and_evaluate(_lm_config(), str(tmp_path))
    with open(tmp_path / "history.jsonl") as f:
        train = [r for r in map(json.loads, f) if r["split"] == "train"]
    assert summary["step"] == 8 and np.isfinite(summary["eval"]["perplexity"])
    assert len(train) >= 2 and train[-1]["loss"] < train[0]["loss"]
    assert summary["train"]["src_tokens"] == 0  # the LM reads the target side only

    meta = read_meta(str(tmp_path))
    assert meta["config"]["model_kind"] == "decoder_only"
    params = load_params(str(tmp_path))  # a DecoderOnlyLM checkpoint
    cfg = ModelConfig.from_dict(meta["config"]["model"])
    model_def, _ = split_model(DecoderOnlyLM(cfg, rngs=nnx.Rngs(0)))
    tokenizer = Tokenizer.load(str(tmp_path / "tokenizer" / "spm.model"))
    prompt = np.asarray([tokenizer.encode_one("zwei")] * 2, np.int32)
    out = np.asarray(make_generate_fn(model_def, max_new_tokens=12, temperature=0.0)(
        params, prompt, jax.random.key(0)))
    assert out.shape == (2, 12) and ((out >= 0) & (out < cfg.vocab_size)).all()
    # The one-call loader gives the same greedy continuation, as text.
    lm = load(str(tmp_path))
    assert isinstance(lm, Generator) and lm.step == 8
    texts = lm.generate(["zwei", "zwei", ""], max_new_tokens=12, temperature=0.0)
    assert texts[:2] == tokenizer.decode(out) and isinstance(texts[2], str)
