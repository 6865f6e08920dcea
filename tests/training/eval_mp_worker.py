"""One process of the two-process evaluation test (run by test_evaluate_split.py).

usage: python eval_mp_worker.py PROCESS_ID PORT WORKDIR

Each process owns 2 CPU devices. It reads 3 training batches and gathers the global data
state, then decodes the first LIMIT validation sentences with the split evaluator, and writes
both to WORKDIR/process<PROCESS_ID>.json.
"""

import functools
import json
import os
import sys

import jax
from flax import nnx

from transformer_jax import data
from transformer_jax.config import ModelConfig
from transformer_jax.metrics import corpus_scores
from transformer_jax.nn import Transformer, split_model
from transformer_jax.parallel import make_strategy
from transformer_jax.training.evaluate import Evaluator
from transformer_jax.training.step import eval_step

LIMIT = 21  # sentences decoded: 3 global batches of 8, the last one partly filler
TRAIN_BATCHES = 3


def data_config():
    cfg = data.default_data_config()
    cfg.update(numbers_max=3000, numbers_train_size=200, numbers_validation_size=30,
               numbers_test_size=10, vocab_size=64, max_length=16)
    return cfg


def tiny_model():
    """``(ModelDef, params)``, scaled up so that outputs differ between sentences."""
    model_cfg = ModelConfig(vocab_size=64, d_model=32, num_heads=2, num_layers=1, d_ff=64,
                            max_len=32, dropout_rate=0.0)

    def build():
        return Transformer(model_cfg, rngs=nnx.Rngs(3))

    model_def, _ = split_model(nnx.eval_shape(build))
    params = jax.jit(lambda: jax.tree.map(lambda x: 4 * x, split_model(build())[1]))()
    return model_def, params


def evaluator_for(strategy, model_def, prepared, metric_names) -> Evaluator:
    """An evaluator of 8-row batches with the unsmoothed loss of ``eval_step``."""
    loss_step = strategy.compile_eval_step(functools.partial(eval_step, model_def=model_def))
    return Evaluator(strategy, model_def, prepared, loss_step=loss_step, batch_size=8,
                     metric_names=metric_names)


def main(process_id: int, port: int, workdir: str) -> None:
    jax.distributed.initialize(f"127.0.0.1:{port}", 2, process_id, initialization_timeout=60)
    assert jax.process_count() == 2 and jax.device_count() == 4
    prepared = data.prepare(data_config(), workdir)  # prepared by the test already
    train_it = data.train_iterator(prepared, 8, seed=4)
    for _ in range(TRAIN_BATCHES):
        next(train_it)
    state = train_it.get_state()  # a collective
    model_def, params = tiny_model()
    evaluator = evaluator_for(make_strategy("shard_map"), model_def, prepared,
                              metric_names=("bleu",))
    _, hyps, refs = evaluator.translations(params, "validation", LIMIT)
    out = {"state": state, "hypotheses": hyps, "bleu": corpus_scores(hyps, refs, ("bleu",))}
    with open(os.path.join(workdir, f"process{process_id}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", 2)  # before any JAX work
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
