"""Fine-tune a Marian / OPUS-MT model imported into a work directory, on your text files.

  python -m transformer_jax.interop.marian import opus-mt-en-de --workdir runs/en-de
  python train.py --config configs/finetune_marian.py:runs/en-de --workdir runs/en-de \\
      --config.data.path=my_corpus --config.data.source_lang=en --config.data.target_lang=de

The text after ``:`` is the imported work directory: the model settings come from its
``marian/model_config.json`` and the tokenizer is its ``tokenizer/spm.model`` (never
retrained). ``data.path`` holds aligned ``{train,val}.{src,tgt}`` text files (as for
configs/multi30k.py). The run starts from the imported weights (its checkpoint is marked
params-only) with a fresh optimizer: Adam at a constant learning rate of 2e-5 with gradient
clipping, as usual for fine-tuning a pretrained model; lower ``num_train_steps`` for a try.
Translate the result with ``python -m transformer_jax.translate --workdir runs/en-de`` and
export it with ``python -m transformer_jax.interop.marian export runs/en-de --to DIR``.
"""

import json
import os

from transformer_jax.training import default_config


def get_config(workdir: str = ""):
    path = os.path.join(workdir, "marian", "model_config.json")
    if not workdir or not os.path.isfile(path):
        raise ValueError(
            f"no imported model at {path or workdir!r}; pass the work directory written by "
            "'python -m transformer_jax.interop.marian import' as "
            "--config configs/finetune_marian.py:WORKDIR."
        )
    with open(path, encoding="utf-8") as f:
        model = json.load(f)
    c = default_config()
    c.num_train_steps = 1000
    c.batch_size = 16
    c.log_every_steps = 50
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 500
    c.eval_metrics = "bleu,chrf"
    c.eval_num_sentences = 200
    c.eval_beam_size = 4
    c.eval_length_penalty = 0.6
    c.model.update(model)

    d = c.data
    d.source = "text"
    d.path = ""
    d.train_split = "train"
    d.eval_split = "val"
    d.test_split = ""
    d.vocab_size = model["vocab_size"]  # the imported tokenizer's
    d.max_length = 128
    d.packing = True

    o = c.optimizer
    o.name = "adam"
    o.schedule = "constant"
    o.learning_rate = 2e-5
    o.b2 = 0.999
    o.eps = 1e-8
    o.label_smoothing = 0.1
    o.clip_norm = 1.0
    return c
