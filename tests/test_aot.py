"""Ahead-of-time builds: StableHLO exports for CUDA/TPU and a real XLA:TPU compile (libtpu).

Exports run with tiny models on CPU stand-in devices; the TPU compile of the paper's base
config needs libtpu (``pip install -e .[aot]``) and is skipped, saying so, without it.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from helpers import HAS_LIBTPU, needs_libtpu

from transformer_jax import aot
from transformer_jax.training import default_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(d_model=32, num_heads=2, num_layers=1, d_ff=64, max_len=16)


def tiny_config(model_kind="encoder_decoder", **top):
    c = default_config()
    c.model_kind = model_kind
    c.batch_size = 8
    c.data.max_length = 16
    c.data.vocab_size = 64
    if model_kind == "decoder_only":
        c.eval_metrics = ""
    for key, value in TINY.items():
        setattr(c.model, key, value)
    for key, value in top.items():
        setattr(c, key, value)
    return c


def check_clean(results):
    for name, facts in results.items():
        assert facts["exported"], name
        assert not facts["f64"], f"{name} computes in float64"
        assert facts["host_callbacks"] == [], name
        assert facts["stablehlo_bytes"] > 10_000, name


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("model_kind,parallelism", [
    ("encoder_decoder", "shard_map"), ("decoder_only", "sharded")])
def test_export_train_and_decode(platform, model_kind, parallelism):
    config = tiny_config(model_kind, parallelism=parallelism)
    config.sharding.fsdp, config.sharding.tensor = 2, 2
    programs, info = aot.build_programs(config, aot.stand_in_devices(4))
    assert [p.name for p in programs] == ["train_step", "decode_greedy", "decode_beam4"]
    assert info["num_devices"] == 4 and info["parallelism"] == parallelism
    results = aot.export_programs(programs, platform)
    check_clean(results)
    assert results["train_step"]["nr_devices"] == 4
    # Decoding spans the devices as the evaluator runs it: params replicated, rows split.
    assert results["decode_greedy"]["nr_devices"] == 4
    if parallelism == "sharded":
        assert info["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}


def test_bfloat16_export_keeps_float32_state():
    config = tiny_config()
    config.model.dtype = "bfloat16"
    programs, _ = aot.build_programs(config, aot.stand_in_devices(2), decode=False)
    state = programs[0].args[0]
    dtypes = {x.dtype for x in jax.tree_util.tree_leaves((state.params, state.opt_state))
              if x.ndim > 0}
    assert dtypes == {jnp.dtype(jnp.float32)}
    exported = jax.export.export(programs[0].fn, platforms=("cuda",))(*programs[0].args)
    text = exported.mlir_module()
    assert "bf16" in text  # the matmuls do run in bfloat16
    assert all(a.dtype != jnp.float64 for a in exported.out_avals)
    check_clean(aot.export_programs(programs, "cuda"))


def test_inspect_stablehlo_finds_callbacks_and_f64():
    text = textwrap.dedent("""
        %0 = stablehlo.custom_call @xla_ffi_python_gpu_callback(%arg0) : (tensor<2xf32>) -> ()
        %1 = stablehlo.convert %arg1 : (tensor<2xf32>) -> tensor<2xf64>
        %2 = stablehlo.custom_call @cudnn$fmhaSoftmax(%arg0) : (tensor<2xf32>) -> tensor<2xf32>
    """)
    facts = aot.inspect_stablehlo(text)
    assert facts["custom_calls"] == ["cudnn$fmhaSoftmax", "xla_ffi_python_gpu_callback"]
    assert facts["host_callbacks"] == ["xla_ffi_python_gpu_callback"]
    assert facts["f64"]
    assert not aot.inspect_stablehlo("tensor<2xf32>")["f64"]


def write_config(tmp_path, *lines: str) -> str:
    body = [
        "from transformer_jax.training import default_config",
        "def get_config():",
        "    c = default_config()",
        "    c.batch_size = 8",
        "    c.data.max_length, c.data.vocab_size = 16, 64",
        "    c.model.d_model, c.model.num_heads, c.model.d_ff = 32, 2, 64",
        "    c.model.num_layers, c.model.max_len = 1, 16",
        *(f"    {line}" for line in lines),
        "    return c",
    ]
    path = tmp_path / "tiny.py"
    path.write_text("\n".join(body) + "\n")
    return str(path)


def run_cli(*args, env=None):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.run([sys.executable, "-m", "transformer_jax.aot", *args], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_cli_exports_pmap_config_without_its_data(tmp_path):
    # The data section names a directory that does not exist: AOT never reads data.
    config = write_config(tmp_path, 'c.parallelism = "pmap"', 'c.data.source = "text"',
                          'c.data.path = "/nonexistent/corpus"')
    out = tmp_path / "report.json"
    proc = run_cli("--config", config, "--platform", "cuda", "--num_devices", "2",
                   "--json", str(out), "--config.model.dtype=bfloat16")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["exported"] and report["platform"] == "cuda"
    assert report["num_devices"] == 2 and report["mesh"] == {"data": 2}
    assert report["parallelism"] == "shard_map" and "pmap" in report["note"]
    assert report["dtype"] == "bfloat16"
    assert set(report["programs"]) == {"train_step", "decode_greedy", "decode_beam4"}
    assert "train_step" in proc.stdout and "exported" in proc.stdout


@pytest.mark.parametrize("lines,args,message", [
    ((), ["--topology", "v5e:3x3"], "topology"),
    ((), ["--platform", "cuda", "--config.model.num_heads=3"], "divisible"),
    ((), ["--platform", "cuda", "--config.model.no_such_key=1"], "unknown config key"),
    (("c.model.d_model = (",), ["--platform", "cuda"], "could not be loaded"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, lines, args, message):
    if args[0] == "--topology" and not HAS_LIBTPU:
        pytest.skip("libtpu is not installed (pip install -e .[aot])")
    proc = run_cli("--config", write_config(tmp_path, *lines), *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error:"), proc.stderr
    assert message in proc.stderr


@pytest.mark.faults
def test_overrides_are_typed_as_train_py_types_them(tmp_path):
    # model.num_encoder_layers defaults to None (an int placeholder): "2" must become 2.
    config = aot.load_config(write_config(tmp_path), [
        "--config.model.num_encoder_layers=2", "--config.model.dtype=bfloat16",
        "--config.fit_steps_to_time=true", "--config.optimizer.learning_rate=0.5"])
    assert config.model.num_encoder_layers == 2
    assert isinstance(config.model.num_encoder_layers, int)
    assert config.model.dtype == "bfloat16" and config.fit_steps_to_time is True
    assert config.optimizer.learning_rate == 0.5
    with pytest.raises(aot.AotError, match=r"num_encoder_layers=x: invalid literal for int"):
        aot.load_config(write_config(tmp_path), ["--config.model.num_encoder_layers=x"])
    with pytest.raises(aot.AotError, match="unknown config key"):
        aot.load_config(write_config(tmp_path), ["--config.model.no_such_key=1"])


def test_missing_libtpu_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(aot.AotError, match=r"needs libtpu.*pip install -e \.\[aot\]"):
        aot.tpu_devices("v5e:2x2")


@needs_libtpu
def test_compile_for_tpu_v5e_topology():
    # A tiny config: the paper's base config compiles the same way but takes minutes of CPU
    # (python -m transformer_jax.aot --config configs/wmt14_ende_base.py --topology v5e:2x2).
    report = aot.run(tiny_config(), topology="v5e:2x2")
    assert report["compiled"] and report["platform"] == "tpu" and report["topology"] == "v5e:2x2"
    assert report["num_devices"] == 4 and report["mesh"] == {"data": 4}
    assert report["device_kind"] == "TPU v5 lite"
    assert report["device_memory_bytes"] == 16 * 2**30 and report["fits"] is True
    # The replicated state (float32 params + two Adam moments) is an argument of every chip.
    assert 3 * 4 * report["params"] < report["per_device_bytes"] < 2**30
    # Forward + backward >= 6 * params * tokens a side per chip (2 of 8 rows, 16 tokens).
    assert report["flops_per_device"] > 6 * report["params"] * 2 * 16
    assert report["flops_per_step"] == pytest.approx(4 * report["flops_per_device"])
    for name in ("decode_greedy", "decode_beam4"):
        assert report["programs"][name]["compiled"] and report["programs"][name]["fits"], name


def test_program_refused_for_lack_of_hbm_is_reported_not_raised():
    class Refused:  # what XLA:TPU raises when a program's temporaries exceed the chip
        def trace(self, *args):
            raise RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
                               "required for HLO temporaries (20.11G) exceeds available HBM "
                               "(15.75G).")

    class Device:
        device_kind = "TPU v5 lite"

    facts = aot.compile_for_topology([aot.Program("decode_beam4", Refused(), (), 4)],
                                     [Device()])["decode_beam4"]
    assert facts["compiled"] is False and facts["fits"] is False
    assert facts["per_device_bytes"] == int(20.11 * 2**30)
    report = {"programs": {"decode_beam4": facts}}
    assert aot.problems(report) == ["decode_beam4 needs 20.11 GiB per chip, more than the "
                                    "16.00 GiB a chip has"]


@needs_libtpu
def test_multi_host_slice_meshes_keep_each_process_rows_together():
    # jax.make_mesh orders TPU devices by physical coordinates: on v5e-256 (64 hosts of 4
    # chips) process 0 held batch blocks 0, 1, 16 and 17, not one run of rows to load.
    from transformer_jax.parallel import Sharded, ShardMap

    devices = aot.tpu_devices("v5e:16x16")
    assert len({d.process_index for d in devices}) == 64
    data = ShardMap(devices)
    sharded = Sharded({**tiny_config().sharding.to_dict(), "fsdp": 4}, devices)
    for driver in (data, sharded):
        mesh_devices = list(driver.mesh.devices.flat)
        processes = [d.process_index for d in mesh_devices]
        assert processes == sorted(processes)  # every process's chips are one block
        assert driver.data_shard() == (0, 64)  # process 0 loads the first 1/64 of the rows

