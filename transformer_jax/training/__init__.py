"""Training: config, optimizer, pure train/eval steps, the run's build, the loop and its hooks.

Entry points::

    from transformer_jax.training import default_config, train_and_evaluate

    config = default_config()                 # or configs/*.py get_config()
    summary = train_and_evaluate(config, "runs/demo")

The pieces, in the order a run uses them: ``validate_config`` (``defaults``), ``build_run``
(``build``: model, optimizer, parallelism strategy, state layout, compiled steps; also what
``transformer_jax.aot`` compiles), ``setup`` (``session``), ``train`` / ``finish`` (``loop``)
with the ``hooks``. Reading a finished run is ``transformer_jax.inference.load("runs/demo")``
(or ``transformer_jax.checkpoints.load_params``).
"""

from transformer_jax.training.build import Run, build_run
from transformer_jax.training.defaults import default_config, validate_config
from transformer_jax.training.loop import train_and_evaluate
from transformer_jax.training.optim import make_optimizer, make_schedule, paper_schedule
from transformer_jax.training.step import TrainState, create_train_state, eval_step, train_step

__all__ = [
    "Run",
    "TrainState",
    "build_run",
    "create_train_state",
    "default_config",
    "eval_step",
    "make_optimizer",
    "make_schedule",
    "paper_schedule",
    "train_and_evaluate",
    "train_step",
    "validate_config",
]
