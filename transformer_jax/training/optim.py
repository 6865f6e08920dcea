"""Learning-rate schedules and the optax optimizer used for training.

Schedules take optax's update counter ``count`` (0 for the first update) and return the
learning rate of that update. The paper formula counts steps from 1, so it is evaluated at
``step = count + 1``.

The optimizer is built from the ``optimizer`` section of the training config:

  name              "adam" | "adamw"
  schedule          "paper" | "warmup_rsqrt" | "warmup_cosine" | "constant"
  learning_rate     peak rate; for "paper" the constant factor in front of the formula
  warmup_steps      linear warm-up length in optimizer updates
  end_learning_rate final rate of "warmup_cosine"
  b1, b2, eps       Adam moments (paper: 0.9, 0.98, 1e-9)
  weight_decay      decoupled decay for "adamw" (biases, norm scales/offsets excluded)
  clip_norm         global-norm gradient clipping, 0 or None to disable
  grad_accum_steps  micro-batches per update (optax.MultiSteps), 1 to disable
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "SCHEDULES",
    "OPTIMIZERS",
    "constant_schedule",
    "decay_mask",
    "make_optimizer",
    "make_schedule",
    "paper_schedule",
    "warmup_cosine_schedule",
    "warmup_rsqrt_schedule",
]

SCHEDULES = ("paper", "warmup_rsqrt", "warmup_cosine", "constant")
OPTIMIZERS = ("adam", "adamw")

Schedule = Callable[[jax.Array | int], jax.Array]


def _check_warmup(warmup_steps: int) -> None:
    if int(warmup_steps) < 1:
        raise ValueError(
            f"warmup_steps must be >= 1 for this schedule; got {warmup_steps}. "
            "Set optimizer.warmup_steps to a positive number of updates."
        )


def paper_schedule(d_model: int, warmup_steps: int, scale: float = 1.0) -> Schedule:
    """Vaswani et al. (2017), eq. 3: ``scale * d_model^-0.5 * min(s^-0.5, s * warmup^-1.5)``.

    Args:
      d_model: model width D.
      warmup_steps: steps of linear increase before the inverse-square-root decay.
      scale: constant factor in front (1.0 reproduces the paper).

    Returns:
      ``schedule(count) -> lr`` with ``s = count + 1`` (optax counts from 0).
    """
    _check_warmup(warmup_steps)
    if int(d_model) < 1:
        raise ValueError(f"d_model must be positive for the paper schedule; got {d_model}.")
    factor = float(scale) * float(d_model) ** -0.5
    warmup = float(warmup_steps)

    def schedule(count):
        step = jnp.asarray(count, jnp.float32) + 1.0
        return factor * jnp.minimum(step**-0.5, step * warmup**-1.5)

    return schedule


def warmup_rsqrt_schedule(peak: float, warmup_steps: int) -> Schedule:
    """Linear warm-up to ``peak`` over ``warmup_steps``, then ``peak * sqrt(warmup / s)``.

    With ``peak = d_model^-0.5 * warmup^-0.5`` this equals :func:`paper_schedule`.
    """
    _check_warmup(warmup_steps)
    warmup = float(warmup_steps)

    def schedule(count):
        step = jnp.asarray(count, jnp.float32) + 1.0
        return peak * jnp.minimum(step / warmup, jnp.sqrt(warmup / step))

    return schedule


def warmup_cosine_schedule(
    peak: float, warmup_steps: int, total_steps: int, end_value: float = 0.0
) -> Schedule:
    """Linear warm-up from 0 to ``peak``, then cosine decay to ``end_value`` at ``total_steps``."""
    _check_warmup(warmup_steps)
    if int(total_steps) <= int(warmup_steps):
        raise ValueError(
            f"warmup_cosine needs num_train_steps ({total_steps}) > warmup_steps "
            f"({warmup_steps}); lower optimizer.warmup_steps or raise num_train_steps."
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=int(warmup_steps),
        decay_steps=int(total_steps),
        end_value=end_value,
    )


def constant_schedule(value: float) -> Schedule:
    """The same learning rate for every update."""

    def schedule(count):
        return jnp.full((), value, jnp.float32) + 0.0 * jnp.asarray(count, jnp.float32)

    return schedule


def make_schedule(opt: Any, *, d_model: int, num_train_steps: int) -> Schedule:
    """Schedule named by ``opt.schedule`` (see the module docstring for the keys read)."""
    name = opt.schedule
    if name == "paper":
        return paper_schedule(d_model, opt.warmup_steps, scale=opt.learning_rate)
    if name == "warmup_rsqrt":
        return warmup_rsqrt_schedule(opt.learning_rate, opt.warmup_steps)
    if name == "warmup_cosine":
        end = float(_get(opt, "end_learning_rate", 0.0))
        return warmup_cosine_schedule(opt.learning_rate, opt.warmup_steps, num_train_steps, end)
    if name == "constant":
        return constant_schedule(opt.learning_rate)
    raise ValueError(
        f"unknown optimizer.schedule={name!r}; choose one of {', '.join(SCHEDULES)}."
    )


def _get(cfg: Any, key: str, default: Any) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


_NO_DECAY_LEAVES = ("bias", "scale", "offset")


def _path_names(path) -> list[str]:
    names = []
    for entry in path:
        key = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))
        names.append(str(key).lower())
    return names


def decay_mask(params):
    """Pytree of bools: True where weight decay applies.

    Excluded: leaves named ``bias``/``*_bias``, ``scale``, ``offset`` and anything under a
    module whose name contains ``norm`` (layer norms). Matrices and embeddings are decayed.
    """

    def wants_decay(path, _leaf) -> bool:
        names = _path_names(path)
        leaf = names[-1] if names else ""
        if leaf in _NO_DECAY_LEAVES or leaf.endswith("_bias"):
            return False
        return not any("norm" in name for name in names[:-1])

    return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_optimizer(
    opt: Any, *, d_model: int, num_train_steps: int
) -> tuple[optax.GradientTransformation, Schedule]:
    """Build ``(tx, schedule)`` from an ``optimizer`` config section.

    ``num_train_steps`` counts optimizer updates (after accumulation). With
    ``grad_accum_steps = k > 1`` the transformation is wrapped in ``optax.MultiSteps``: it
    must be called once per micro-batch, applies the mean of k micro-batch gradients every
    k-th call and returns zero updates in between. The schedule then advances once per update.
    """
    schedule = make_schedule(opt, d_model=d_model, num_train_steps=num_train_steps)
    name = opt.name
    b1, b2, eps = float(opt.b1), float(opt.b2), float(opt.eps)
    if name == "adam":
        core = optax.adam(schedule, b1=b1, b2=b2, eps=eps)
    elif name == "adamw":
        core = optax.adamw(
            schedule, b1=b1, b2=b2, eps=eps, weight_decay=float(opt.weight_decay), mask=decay_mask
        )
    else:
        raise ValueError(
            f"unknown optimizer.name={name!r}; choose one of {', '.join(OPTIMIZERS)}."
        )
    clip = _get(opt, "clip_norm", None)
    parts = []
    if clip:
        if float(clip) < 0:
            raise ValueError(f"optimizer.clip_norm must be >= 0; got {clip}.")
        parts.append(optax.clip_by_global_norm(float(clip)))
    parts.append(core)
    tx = optax.chain(*parts) if len(parts) > 1 else core
    accum = int(_get(opt, "grad_accum_steps", 1))
    if accum < 1:
        raise ValueError(f"optimizer.grad_accum_steps must be >= 1; got {accum}.")
    if accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accum)
    return tx, schedule
