"""LoRA fine-tuning of a Marian / OPUS-MT model imported into a work directory.

  python -m transformer_jax.interop.marian import opus-mt-en-de --workdir runs/en-de-lora
  python train.py --config configs/finetune_lora.py:runs/en-de-lora --workdir runs/en-de-lora \\
      --config.data.path=my_corpus --config.data.source_lang=en --config.data.target_lang=de

Everything as configs/finetune_marian.py (the imported model's settings and tokenizer, the
run starting from its params-only checkpoint), except that the model gets LoRA adapters
(``model.lora_rank``, ``model.lora_alpha``, ``model.lora_targets``; ``nn.lora``) and training
updates them alone: the optimizer holds state for the adapters only, the base weights stay
bit-for-bit the imported ones. LoRA takes a larger learning rate than full fine-tuning
(1e-3 here against 2e-5). Save the adapters alone with
``transformer_jax.checkpoints.save_adapters`` and fold them into the weights for decoding
with ``transformer_jax.nn.adapters.merge_lora``.

Without a work directory (``--config configs/finetune_lora.py``) the same LoRA settings apply
to the built-in numbers task's fresh model: a quick check of the settings, not a fine-tune.
"""

import importlib.util
import os

from transformer_jax.training import default_config

_spec = importlib.util.spec_from_file_location(
    "finetune_marian", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    "finetune_marian.py"))
_marian = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_marian)


def get_config(workdir: str = ""):
    c = _marian.get_config(workdir) if workdir else default_config()
    c.model.lora_rank = 8
    c.model.lora_alpha = 16.0
    c.model.lora_targets = "query,key,value,out"
    c.optimizer.learning_rate = 1e-3
    return c
