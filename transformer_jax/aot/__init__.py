"""Compile for a TPU topology or export for CUDA without the accelerator: ``python -m
transformer_jax.aot``.

The train step of a training config is the one ``train.py`` runs: both build it with
``training.build.build_run`` (config defaults and validation, the optimizer, the parallelism
strategy with its mesh, the per-device step), here from abstract inputs: no data is read or
prepared and no parameter is materialised. The vocabulary size is ``data.vocab_size``
(``--vocab_size`` overrides it) and a micro-batch is ``batch_size x data.max_length`` token
ids, with the segment/position arrays of packed rows when ``data.packing``. The cached decode
programs (greedy and beam search; ``eval_batch_size`` rows split over the devices, as the
evaluator decodes) are built too. Modules: ``programs`` (what is built), ``targets`` (compile
/ export), ``cli`` (the command line).

Two targets:

* ``--topology v5e:2x2`` (needs libtpu, ``pip install -e .[aot]``): every program is compiled
  by XLA:TPU for that topology. The train step reports per-chip memory
  (``compiled.memory_analysis()``), FLOPs (``cost_analysis()``) and whether it fits the chip.
* ``--platform cuda`` (or ``tpu``): every program is exported with ``jax.export`` to
  StableHLO for that platform over ``--num_devices`` devices (CPU devices stand in for the
  accelerators: an export keeps the shardings, not the devices). Reports the StableHLO size,
  custom calls, host callbacks and float64 types found.

``parallelism="pmap"`` is built as the same per-device step under ``shard_map`` (pmap cannot
be exported or compiled ahead of time; it runs that program). Exit codes: 0 done, 1 a program
does not fit the chip or holds a host callback or float64, 2 a problem with the arguments,
the config or the environment (one line on stderr).

  python -m transformer_jax.aot --config configs/wmt14_ende_big.py --topology v5e:2x2 \\
      --json aot.json
  python -m transformer_jax.aot --config configs/wmt14_ende_base.py --platform cuda
"""

from transformer_jax.aot.cli import load_config, main, problems, summary
from transformer_jax.aot.programs import (
    AotError,
    Program,
    build_programs,
    stand_in_devices,
    tpu_devices,
)
from transformer_jax.aot.targets import (
    EXPORT_PLATFORMS,
    GIB,
    TPU_HBM_BYTES,
    compile_for_topology,
    export_programs,
    inspect_stablehlo,
    run,
)

__all__ = [
    "EXPORT_PLATFORMS",
    "GIB",
    "TPU_HBM_BYTES",
    "AotError",
    "Program",
    "build_programs",
    "compile_for_topology",
    "export_programs",
    "inspect_stablehlo",
    "load_config",
    "main",
    "problems",
    "run",
    "stand_in_devices",
    "summary",
    "tpu_devices",
]
