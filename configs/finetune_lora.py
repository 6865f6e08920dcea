"""LoRA fine-tuning of a trained run of this library, or of an imported Marian / OPUS-MT model.

A run trained here (the new run goes to its own work directory; the trained one is only read)::

  python train.py --config configs/finetune_lora.py:runs/base --workdir runs/base-lora \\
      --config.data.path=my_corpus

A Marian model imported into a work directory (the fine-tuning runs in that directory)::

  python -m transformer_jax.interop.marian import opus-mt-en-de --workdir runs/en-de-lora
  python train.py --config configs/finetune_lora.py:runs/en-de-lora --workdir runs/en-de-lora \\
      --config.data.path=my_corpus --config.data.source_lang=en --config.data.target_lang=de

The text after ``:`` is the model to start from. For a trained run it is
``training.init_from.finetune_config``: the run's own settings (model, tokenizer, data keys,
evaluation) with ``init_from`` naming it, so the new run starts from its newest parameters
and copies its tokenizer; ``data.*`` overrides point it at the new corpus. For an imported
model it is configs/finetune_marian.py. Either way the model gets LoRA adapters
(``model.lora_rank``, ``model.lora_alpha``, ``model.lora_targets``; ``nn.lora``) and
training updates them alone: the optimizer holds state for the adapters only, the base
weights stay bit for bit the ones started from. LoRA takes a larger learning rate than full
fine-tuning (1e-3 here against 2e-5). ``python -m transformer_jax.translate --workdir
runs/base-lora`` decodes with the adapters merged into the weights; save the adapters alone
with ``transformer_jax.checkpoints.save_adapters``.

Without a work directory (``--config configs/finetune_lora.py``) the same LoRA settings apply
to the built-in numbers task's fresh model: a quick check of the settings, not a fine-tune.
"""

import importlib.util
import os

from transformer_jax.training import default_config
from transformer_jax.training.init_from import finetune_config

_spec = importlib.util.spec_from_file_location(
    "finetune_marian", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    "finetune_marian.py"))
_marian = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_marian)


def get_config(start: str = ""):
    if not start:
        c = default_config()
    elif os.path.isfile(os.path.join(start, "marian", "model_config.json")):
        c = _marian.get_config(start)
    else:
        c = finetune_config(start)
    c.model.lora_rank = 8
    c.model.lora_alpha = 16.0
    c.model.lora_targets = "query,key,value,out"
    c.optimizer.learning_rate = 1e-3
    return c
