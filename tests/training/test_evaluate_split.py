"""Eval decoding split over processes and devices gives the sentences of a plain loop."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from transformer_jax import data
from transformer_jax.inference import make_translate_fn
from transformer_jax.metrics import corpus_scores
from transformer_jax.parallel import make_strategy
from transformer_jax.training.evaluate import assemble_translations

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval_mp_worker.py")
# The worker script is also the home of the set-up both sides share (tests run in importlib
# mode, where a sibling file is not importable by name).
_spec = importlib.util.spec_from_file_location("eval_mp_worker", WORKER)
_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_worker)
LIMIT, TRAIN_BATCHES = _worker.LIMIT, _worker.TRAIN_BATCHES
data_config, tiny_model = _worker.data_config, _worker.tiny_model
TIMEOUT_S = 300  # generous: the machine is shared


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("eval_split"))


@pytest.fixture(scope="module")
def setup(workdir):
    prepared = data.prepare(data_config(), workdir)
    return (prepared, *tiny_model())


def evaluator(setup, devices):
    prepared, model_def, _ = setup
    mode = "none" if devices == 1 else "shard_map"
    return _worker.evaluator_for(make_strategy(mode, devices=jax.devices()[:devices]),
                                 model_def, prepared, metric_names=("bleu", "exact_match"))


@pytest.fixture(scope="module")
def plain_loop(setup):
    """Reference: each sentence alone (a batch of one) through the decoder on one device."""
    prepared, model_def, params = setup
    translate = make_translate_fn(model_def, max_length=prepared.max_length)
    singles = data.eval_batches(prepared, "validation", 1, process_index=0, process_count=1)
    hyps = []
    for i in range(LIMIT):
        assert singles[i]["index"].tolist() == [i]
        hyps += prepared.tokenizer.decode(np.asarray(translate(params, singles[i]["inputs"])))
    return hyps


def test_one_process_matches_a_plain_loop(setup, plain_loop):
    assert len(set(plain_loop)) >= 4  # distinct outputs: a shuffled order would be caught
    indices, hyps, refs = evaluator(setup, 1).translations(setup[2], "validation", LIMIT)
    assert indices == list(range(LIMIT))
    assert hyps == plain_loop
    assert refs == [t for _, t in data.raw_pairs(setup[0], "validation")[:LIMIT]]


def test_rows_of_two_processes_gather_to_the_one_process_result(setup, plain_loop):
    processes = 2
    ev = evaluator(setup, 2)
    parts = [ev.decode_local(setup[2], "validation", LIMIT, process_index=p,
                             process_count=processes) for p in range(processes)]
    assert all(len(index) == 24 // processes for index, _ in parts)  # 1 / P of the rows each
    index = np.concatenate([i for i, _ in parts])
    ids = np.concatenate([x for _, x in parts])
    indices, hyps = assemble_translations(index, ids, LIMIT, setup[0].tokenizer)
    assert indices == list(range(LIMIT))
    assert hyps == plain_loop


def test_missing_rows_are_an_error(setup):
    ids = np.zeros((3, 4), np.int32)
    with pytest.raises(ValueError, match="not each of 0..2 once"):
        assemble_translations(np.array([0, 2, -1]), ids, 3, setup[0].tokenizer)
    with pytest.raises(ValueError, match="not each of 0..1 once"):
        assemble_translations(np.array([0, 1, 1]), ids, 2, setup[0].tokenizer)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_real_processes_agree_with_one(setup, plain_loop, workdir):
    """2 processes x 2 devices: the same strings and BLEU as one process, and the same
    gathered training data state as one process that read the same global batches."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    port, procs = _free_port(), []
    try:
        for i in range(2):
            procs.append(subprocess.Popen(
                [sys.executable, WORKER, str(i), str(port), workdir], env=env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True))
        logs = [p.communicate(timeout=TIMEOUT_S)[0].decode()[-3000:] for p in procs]
    finally:
        for p in procs:  # never leave a worker behind (its own process group only)
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log
    outs = []
    for i in range(2):
        with open(os.path.join(workdir, f"process{i}.json")) as f:
            outs.append(json.load(f))
    assert outs[0] == outs[1]
    assert outs[0]["hypotheses"] == plain_loop
    refs = [t for _, t in data.raw_pairs(setup[0], "validation")[:LIMIT]]
    assert outs[0]["bleu"] == corpus_scores(plain_loop, refs, ("bleu",))
    one = data.train_iterator(setup[0], 8, seed=4, process_index=0, process_count=1)
    for _ in range(TRAIN_BATCHES):
        next(one)
    assert outs[0]["state"] == one.get_state()
