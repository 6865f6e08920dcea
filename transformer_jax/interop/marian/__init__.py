"""Hugging Face MarianMT / OPUS-MT models: load, translate, write work directories, export.

In Python (Marian's own ids; see ``marian.hf``)::

    model, config, tokenizer = from_pretrained("opus-mt-en-de")   # a local HF directory
    logits = model({"inputs": src_ids, "targets": labels})   # == MarianMTModel(labels=...)
    ids = generate(model, tokenizer.batch(["Hello world"]), num_beams=4)   # == generate()
    tokenizer.decode(ids)

On the command line (errors: one sentence on stderr, exit status 2)::

    python -m transformer_jax.interop.marian import opus-mt-en-de --workdir runs/en-de
    python -m transformer_jax.translate --workdir runs/en-de < input.txt
    python train.py --config configs/finetune_marian.py:runs/en-de --workdir runs/en-de ...
    python -m transformer_jax.interop.marian export runs/en-de --to exported/

Modules: ``hf`` (reading and writing Hugging Face directories, ``generate``), ``weights``
(the parameter mapping), ``tokenizer`` (``MarianTokenizer``), ``workdir`` (work directories
and the command line).

A work directory uses this library's id convention (pad 0, EOS 1, unk 2): ``import`` moves
Marian's ``<pad>``, ``</s>`` and ``<unk>`` rows to the front of the vocabulary (the other
tokens keep their order; the order is stored in ``marian/id_order.json``) and ``export``
moves them back. Its layout is a training run's: ``checkpoints/0`` (params-only, marked
``params_only`` in its metadata so that ``train.py`` fine-tunes from it), ``tokenizer/spm.model``
(one SentencePiece model, see ``MarianTokenizer.joint_model_proto``) and ``marian/`` (the
original config and tokenizer files, ``model_config.json`` for the fine-tuning config).
"""

from transformer_jax.interop.marian.hf import (
    Pretrained,
    from_pretrained,
    generate,
    model_with_params,
    read_state_dict,
    save_pretrained,
)
from transformer_jax.interop.marian.tokenizer import MarianTokenizer, TokenizerFilesError
from transformer_jax.interop.marian.weights import ConversionError
from transformer_jax.interop.marian.workdir import export_workdir, import_workdir, main

__all__ = [
    "ConversionError",
    "MarianTokenizer",
    "Pretrained",
    "TokenizerFilesError",
    "model_with_params",
    "export_workdir",
    "from_pretrained",
    "generate",
    "import_workdir",
    "main",
    "read_state_dict",
    "save_pretrained",
]
