"""Starting a run from the weights of another trained work directory (``config.init_from``).

  python train.py --config configs/finetune_lora.py:runs/base --workdir runs/base-lora \\
      --config.data.path=my_corpus
  python train.py --config configs/multi30k.py --config.init_from=runs/base --workdir runs/ft

A new work directory whose ``init_from`` names a trained one starts from that run's newest
checkpoint (its parameters only: the optimizer, the step and the data order start afresh)
and uses that run's tokenizer: ``tokenizer/spm.model`` is copied into the new work directory
before the data are prepared, so the token ids mean what the trained embeddings learned, and
every checkpoint records its sha256 (resuming or translating with another one is refused).
The model must have the trained run's architecture (``checkpoints.ARCHITECTURE_KEYS``);
other model keys (dropout, LoRA adapters, attention implementation, precision) may change.
:func:`finetune_config` gives a config with the trained run's settings, for the config
files (``configs/finetune_lora.py:WORKDIR``). A trained run that itself carried LoRA
adapters is started from with its adapters folded in (``nn.adapters.merge_lora``).

``<workdir>/init_from.json`` records where the run started: the trained work directory, its
step, the sha256 of its parameters (``nn.adapters.base_sha256``: the LoRA adapters saved by
``checkpoints.save_adapters`` carry the same one) and of its tokenizer. Once the new run has
a checkpoint, ``init_from`` is not read again: a resume continues from the run's own state.
Everything here is checked before anything is written; a problem is one sentence.
"""

from __future__ import annotations

import dataclasses
import json
import os

import ml_collections

from transformer_jax.checkpoints import (
    CHECKPOINT_DIR,
    check_compatible,
    load_params,
    read_meta,
)
from transformer_jax.config import ModelConfig
from transformer_jax.data.files import write_atomically
from transformer_jax.data.pipeline import TOKENIZER_FILE
from transformer_jax.errors import CheckpointMismatchError, WorkdirError
from transformer_jax.nn import DEFAULT_MODEL_KIND
from transformer_jax.nn.adapters import base_sha256, merge_lora
from transformer_jax.training.defaults import default_config, model_config
from transformer_jax.training.reporting import CONFIG_FILE, write_json
from transformer_jax.training.workdir import file_sha256

__all__ = ["INIT_FROM_FILE", "StartingPoint", "finetune_config", "starting_point"]

INIT_FROM_FILE = "init_from.json"


@dataclasses.dataclass(frozen=True)
class StartingPoint:
    """The checkpoint a fresh run starts from (:func:`starting_point`).

    Attributes:
      workdir: the trained work directory (absolute).
      step: its newest checkpoint's step.
      model: the model config it was trained with (dict).
      tokenizer: path of its tokenizer; tokenizer_sha256: the sha256 its checkpoint records.
    """

    workdir: str
    step: int
    model: dict
    tokenizer: str
    tokenizer_sha256: str

    def install_tokenizer(self, workdir: str) -> None:
        """Copies the trained run's tokenizer into ``workdir`` (whole or not at all)."""
        path = os.path.join(workdir, TOKENIZER_FILE)
        if not os.path.isfile(path):
            with open(self.tokenizer, "rb") as f:
                write_atomically(path, f.read())

    def params(self) -> dict:
        """The trained parameters (LoRA adapters of the trained run folded in)."""
        params = load_params(self.workdir, self.step)
        config = ModelConfig.from_dict(self.model)
        if config.lora_rank:
            _, params = merge_lora(config, params)
        return params

    def record(self, workdir: str, params) -> None:
        """Writes ``<workdir>/init_from.json`` (module docstring)."""
        write_json(os.path.join(workdir, INIT_FROM_FILE),
                   {"workdir": self.workdir, "step": self.step,
                    "base_sha256": base_sha256(params),
                    "tokenizer_sha256": self.tokenizer_sha256})


def _has_checkpoints(workdir: str) -> bool:
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def starting_point(config: ml_collections.ConfigDict, workdir: str) -> StartingPoint | None:
    """The checkpoint that a fresh run in ``workdir`` starts from: None without
    ``init_from``, or when ``workdir`` holds checkpoints already (a resume).

    Raises:
      WorkdirError: ``init_from`` is no trained work directory, or its tokenizer is missing or
        not the one it trained with, or ``workdir`` holds another tokenizer.
      CheckpointMismatchError: the config's model does not have the trained architecture.
    """
    workdir = os.path.abspath(workdir)
    base = os.path.abspath(config.init_from) if config.init_from else ""
    if base == workdir:
        raise WorkdirError(f"init_from={base} is the --workdir itself; choose a new --workdir "
                           "for the run that starts from it.")
    if not base or _has_checkpoints(workdir):
        return None
    if not os.path.isdir(base):
        raise WorkdirError(f"init_from={base} is not a directory; pass the --workdir of a "
                           "trained run.")
    try:
        meta = read_meta(base)
    except FileNotFoundError:
        raise WorkdirError(f"init_from={base} holds no checkpoint; train it first or pass the "
                           "--workdir of a trained run.") from None
    saved = meta.get("config") or {}
    if not saved.get("model"):
        raise WorkdirError(f"the checkpoint in init_from={base} has no model config; pass the "
                           "--workdir of a run trained by this library.")
    kind = saved.get("model_kind", DEFAULT_MODEL_KIND)
    if kind != config.model_kind:
        raise CheckpointMismatchError(
            f"init_from={base} is a {kind} model but the config asks for model_kind="
            f"{config.model_kind}; set model_kind={kind}.")
    wanted = model_config(config).to_dict()
    check_compatible({"model": saved["model"]}, {"model": wanted}, f"init_from={base}",
                     fix=f"drop that override or start from configs/finetune_lora.py:{base}, "
                         "which takes the trained run's model settings")
    return StartingPoint(base, int(meta["step"]), dict(saved["model"]),
                         *_tokenizer(base, meta, workdir))


def _tokenizer(base: str, meta: dict, workdir: str) -> tuple[str, str]:
    """``(path, sha256)`` of the trained run's tokenizer, checked against its checkpoint and
    against a tokenizer ``workdir`` may hold already."""
    path = os.path.join(base, TOKENIZER_FILE)
    want = (meta.get("tokenizer") or {}).get("sha256")
    if not os.path.isfile(path):
        raise WorkdirError(f"init_from={base} has no tokenizer at {path}; restore the trained "
                           "run's tokenizer/spm.model.")
    sha = file_sha256(path)
    if want and sha != want:
        raise WorkdirError(f"the tokenizer {path} is not the one init_from={base} was trained "
                           "with (sha256 differs); restore the run's tokenizer/spm.model.")
    mine = os.path.join(workdir, TOKENIZER_FILE)
    if os.path.isfile(mine) and file_sha256(mine) != sha:
        raise WorkdirError(f"{workdir} holds a tokenizer other than init_from={base}'s; choose "
                           "a fresh --workdir.")
    return path, sha


def finetune_config(base: str) -> ml_collections.ConfigDict:
    """The settings of the trained run in ``base`` (its ``config.json``: model, data,
    tokenizer size, evaluation) as a fine-tuning config starting from it: ``init_from`` set,
    a fresh Adam at a constant learning rate of 2e-5 with gradient clipping, 1000 updates,
    no time limit, no averaging. Config files add their own changes (LoRA, the data path).

    Raises:
      ValueError: ``base`` holds no ``config.json`` (no run of this library).
    """
    path = os.path.join(base, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"no trained run at {base} (no {CONFIG_FILE}); pass the --workdir of "
                         "a run of train.py, or an imported Marian work directory.")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    c = default_config()
    for key in ("distributed", "sharding"):  # how this run is launched: its own
        saved.pop(key, None)
    c.update(saved)
    c.init_from = os.path.abspath(base)
    c.num_train_steps, c.max_train_minutes, c.fit_steps_to_time = 1000, 0.0, False
    c.average_last = 0
    o = c.optimizer
    o.name, o.schedule, o.learning_rate = "adam", "constant", 2e-5
    o.clip_norm, o.weight_decay = 1.0, 0.0
    return c
