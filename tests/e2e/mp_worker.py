"""One process of the two-process CPU test (run by test_multiprocess.py, not by pytest).

usage: python mp_worker.py PROCESS_ID PORT WORKDIR MODE[,MODE...]

Each process owns 2 CPU devices. For each parallelism MODE ("shard_map": replicated params;
"sharded": data 2 x fsdp 2, so parameters are split across the two processes; "tensor":
tensor 4, so the tensor axis spans the processes and both load every row) the processes
train a tiny Transformer for MP_STEPS steps on a fixed global batch (each feeds its half of the
rows), save one orbax checkpoint collectively into WORKDIR/MODE, and process 0 writes the
losses to WORKDIR/MODE/losses.json. Before that they check, across the two processes, the
refusal of an interleaved mesh, ``chief_first``'s error passing, ``StopVote`` and
``first_failure``.
"""

import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # helpers



def main(process_id: int, port: int, workdir: str, modes: str) -> None:
    from transformer_jax.parallel import initialize

    how = initialize({"coordinator_address": f"127.0.0.1:{port}",
                                  "num_processes": 2, "process_id": process_id,
                                  "initialization_timeout": 60})
    assert how == "config" and jax.process_count() == 2 and jax.device_count() == 4, how
    check_interleaved_mesh_is_refused()
    check_chief_failure_reaches_everyone(process_id)
    check_stop_vote(process_id)
    check_first_failure(process_id)
    for mode in modes.split(","):
        train(process_id, os.path.join(workdir, mode), mode)


def check_interleaved_mesh_is_refused() -> None:
    """A mesh giving each process every other batch block cannot take contiguous rows."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from transformer_jax.errors import ConfigError
    from transformer_jax.parallel import process_rows

    p0, p1 = ([d for d in jax.devices() if d.process_index == i] for i in range(2))
    mesh = Mesh(np.array([p0[0], p1[0], p0[1], p1[1]]), ("data",))
    try:
        process_rows(NamedSharding(mesh, PartitionSpec("data")), 4)
    except ConfigError as err:
        assert "not one aligned run" in str(err), err
    else:
        raise AssertionError("an interleaved mesh was accepted")


def check_chief_failure_reaches_everyone(process_id: int) -> None:
    """chief_first: process 0 fails -> process 1 raises with its message, no hang; a value
    process 0 never sends -> a timeout error."""
    from transformer_jax.errors import DistributedError
    from transformer_jax.parallel import chief_first, from_chief

    def prepare():
        if process_id == 0:
            raise ValueError("data.path has no train.en")
        return "prepared"

    try:
        chief_first(prepare, "prepare", timeout_s=120)
    except DistributedError as err:
        assert process_id == 1 and "process 0 failed in" in str(err), err
        assert "data.path has no train.en" in str(err), err
    except ValueError:
        assert process_id == 0
    else:
        raise AssertionError("chief_first returned although process 0 failed")
    assert chief_first(lambda: process_id, "ok", timeout_s=120) == process_id
    if process_id == 1:
        try:
            from_chief("never-sent", lambda: 0, timeout_s=2)
        except DistributedError as err:
            assert "waited 2 s for process 0" in str(err), err
        else:
            raise AssertionError("from_chief did not time out")


def check_stop_vote(process_id: int) -> None:
    """StopVote across the processes, as the trainer uses it: ``vote`` answers the previous
    update's largest flag, and ``agree_min`` (the fitted num_train_steps) the smallest value
    now, also between votes; each process passes a different value."""
    from transformer_jax.parallel import StopVote

    votes = StopVote()
    assert votes.vote(0) == 0  # nothing agreed before the first vote
    assert votes.vote(3 if process_id == 1 else 0) == 0  # the previous vote: nobody stopped
    assert votes.agree_min(1000 + 7 * process_id) == 1000
    assert votes.agree_min(-5 if process_id == 0 else 9) == -5
    assert votes.vote(0) == 3  # process 1's flag of the vote before reaches process 0 too
    assert votes.agree_min(4200 - process_id) == 4199
    assert votes.vote(5 if process_id == 0 else 0) == 0
    assert votes.current() == 5  # this vote's answer, read now; the next vote repeats it
    assert votes.vote(0) == 5 and votes.current() == 0


def check_first_failure(process_id: int) -> None:
    """After a failure vote every process learns the lowest failed process and its message."""
    from transformer_jax.parallel import first_failure

    assert first_failure(None) is None
    assert first_failure("at update 3: OSError: disk full" if process_id else None) == (
        1, "at update 3: OSError: disk full")
    assert first_failure(f"error {process_id}") == (0, "error 0")


def train(process_id: int, workdir: str, parallelism: str) -> None:
    from flax import nnx
    from helpers import MP_LENGTH, MP_ROWS, MP_STEPS, adam_step, packed_batch, tiny_config

    from transformer_jax.checkpoints import Checkpointer
    from transformer_jax.nn import Transformer, split_model
    from transformer_jax.parallel import make_strategy
    from transformer_jax.training.step import create_train_state

    cfg = tiny_config()
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    mesh = ({"data": 1, "fsdp": 1, "tensor": 4, "rules": {"heads": "tensor", "mlp": "tensor"}}
            if parallelism == "tensor" else
            {"data": 2, "fsdp": 2, "tensor": 1, "rules": {"embed": "fsdp", "mlp": "fsdp"}})
    dp = make_strategy("sharded" if parallelism == "tensor" else parallelism,
                       mesh).for_model(model)
    model_def, params = split_model(model)
    tx, per_device = adam_step(model_def)
    state = create_train_state(params, tx)
    step = dp.compile_train_step(per_device, state)
    state = dp.put_state(state)
    rng = dp.put_rng(jax.random.key(0))
    rows = dp.check_batch_size(MP_ROWS)
    index, count = dp.data_shard()
    assert (index, count) == ((0, 1) if parallelism == "tensor" else (process_id, 2))
    glob = packed_batch(MP_ROWS, MP_LENGTH, seed=5)
    local = {k: v[index * rows:(index + 1) * rows] for k, v in glob.items()}
    losses = []
    for _ in range(MP_STEPS):
        state, metrics = step(state, dp.put_batch(local), rng)
        losses.append(dp.metrics(metrics)["loss"])
    ckpt = Checkpointer(workdir)
    ckpt.save(MP_STEPS, dp.get_state(state), rng=jax.random.key(0),
              config={"model": cfg.to_dict()})
    ckpt.close()
    if process_id == 0:
        with open(os.path.join(workdir, "losses.json"), "w") as f:
            json.dump({"losses": losses, "devices": jax.device_count()}, f)
    # every process checks the checkpoint against the params it holds (its own shards)
    from transformer_jax.checkpoints import load_params

    restored = load_params(workdir)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(restored),
                                 jax.tree_util.tree_leaves(state.params), strict=True):
        for shard in want.addressable_shards:
            np.testing.assert_array_equal(np.asarray(got)[shard.index], np.asarray(shard.data),
                                          err_msg=jax.tree_util.keystr(path))


if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", 2)  # before any JAX work
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
