"""Worker processes for subword sampling: same batches under any worker count, one-line
errors, no orphans when the parent is killed."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from helpers import small_numbers_config

from transformer_jax.data import BATCH_KEYS, DataError, check_data_config, train_iterator
from transformer_jax.data.workers import TokenizerPool

SAMPLING = {"subword_sampling_alpha": 0.2, "subword_sampling_nbest": 8}


def with_workers(prepared, workers, **overrides):
    config = small_numbers_config(num_workers=workers, **SAMPLING, **overrides)
    return prepared.__class__(**{**prepared.__dict__, "config": config})


def batches(it, count):
    return [next(it) for _ in range(count)]


def assert_same(got, want):
    for g, w in zip(got, want, strict=True):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(g[key], w[key], err_msg=key)


def test_worker_counts_give_the_same_batches_and_states_move_between_them(prepared_numbers):
    def build(workers):
        return train_iterator(with_workers(prepared_numbers, workers), 8, seed=3,
                              process_index=0, process_count=1)

    reference = batches(build(0), 12)
    two = build(2)
    head = batches(two, 5)
    state = json.loads(json.dumps(two.get_state()))
    two.close()
    assert_same(head, reference[:5])
    for workers in (1, 0):
        resumed = build(workers)
        resumed.set_state(state)
        assert_same(batches(resumed, 7), reference[5:])


def test_num_workers_is_checked():
    with pytest.raises(ValueError, match=r"data.num_workers=-1 must be an integer >= 0"):
        check_data_config(small_numbers_config(num_workers=-1))


def test_a_worker_error_reaches_the_main_process_as_one_line(prepared_numbers):
    pool = TokenizerPool(prepared_numbers.tokenizer, 1)
    try:
        with pytest.raises(DataError) as caught:  # alpha must be a number
            pool.encode_sampled(["one two"], [0], "not a number", 4, 0)
    finally:
        pool.close()
    message = str(caught.value)
    assert "\n" not in message and message.startswith("data worker process ")
    assert "TypeError" in message


CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from helpers import small_numbers_config
    from transformer_jax.data import prepare, train_iterator

    if __name__ == "__main__":
        config = small_numbers_config(num_workers=2, subword_sampling_alpha=0.2,
                                      subword_sampling_nbest=8)
        it = train_iterator(prepare(config, {workdir!r}), 8, seed=0, process_index=0,
                            process_count=1)
        next(it)
        print("ready", flush=True)
        sys.stdin.read()
""")


def children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True).stdout
    return [int(p) for p in out.split()]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for its reaper is gone too
        return f.read().split(")")[-1].split()[0] != "Z"


def test_workers_die_with_their_parent_even_under_kill_9(numbers_workdir, prepared_numbers):
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = CHILD.format(tests=tests, workdir=numbers_workdir)
    parent = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ})
    try:
        assert parent.stdout.readline().strip() == "ready"
        workers = [p for p in children(parent.pid) if "resource_tracker" not in
                   open(f"/proc/{p}/cmdline").read()]
        assert workers  # started on demand: one or two by now
        parent.send_signal(signal.SIGKILL)  # no cleanup in the parent at all
        parent.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in workers if alive(p)]
    finally:
        parent.kill()
        parent.wait()
