"""Work directories of Marian models: ``import_workdir``, ``export_workdir``, the command line.

A work directory uses this library's id convention (pad 0, EOS 1, unk 2): ``import`` moves
Marian's ``<pad>``, ``</s>`` and ``<unk>`` rows to the front of the vocabulary (the other
tokens keep their order; the order is stored in ``marian/id_order.json``) and ``export``
moves them back. Its layout is a training run's: ``checkpoints/0`` (params-only, marked
``params_only`` in its metadata so that ``train.py`` fine-tunes from it), ``tokenizer/spm.model``
(one SentencePiece model, see ``MarianTokenizer.joint_model_proto``) and ``marian/`` (the
original config and tokenizer files, ``model_config.json`` for the fine-tuning config).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys

import jax
import numpy as np

from transformer_jax.checkpoints import CHECKPOINT_DIR, load_params, read_meta, save_params
from transformer_jax.config import ModelConfig
from transformer_jax.data.pipeline import TOKENIZER_FILE
from transformer_jax.interop.marian.hf import (
    EXTRA_FILES,
    read_pretrained,
    save_pretrained,
)
from transformer_jax.interop.marian.tokenizer import MarianTokenizer, TokenizerFilesError
from transformer_jax.interop.marian.weights import ConversionError
from transformer_jax.nn import DEFAULT_MODEL_KIND
from transformer_jax.nn.adapters import merge_lora

__all__ = ["export_workdir", "import_workdir", "main", "permute_vocab"]

MARIAN_DIR = "marian"  # inside a work directory: original config + tokenizer files
ORDER_FILE, MODEL_CONFIG_FILE = "id_order.json", "model_config.json"


def permute_vocab(params, order) -> dict:
    """Params with vocabulary entry ``k`` taken from entry ``order[k]`` (token tables, output
    kernel columns and the logits bias); other leaves unchanged (numpy copies)."""
    idx = np.asarray(order)
    params = jax.tree_util.tree_map(np.asarray, jax.device_get(params))
    for side in ("encoder", "decoder"):
        if "embedding" in params[side]:
            table = params[side]["embedding"]["tokens"]["embed"]
            table["embedding"] = table["embedding"][idx]
    output = params["decoder"]["output"]
    output["logits_bias"] = output["logits_bias"][idx]
    if "dense" in output:
        output["dense"]["kernel"] = output["dense"]["kernel"][:, idx]
    return params


def _check_new_workdir(workdir: str) -> None:
    if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
        raise ConversionError(
            f"{workdir} already exists and is not empty; choose a new --workdir."
        )


def _id_order(tokenizer: MarianTokenizer) -> list[int]:
    special = [tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id]
    return special + [i for i in range(tokenizer.vocab_size) if i not in special]


def import_workdir(path: str, workdir: str) -> str:
    """Writes the Marian directory ``path`` as a work directory ``workdir`` (must be new or
    empty); see the module docstring. Everything is written to a temporary sibling first and
    renamed at the end, so a failure leaves nothing behind. Returns the absolute workdir."""
    path, workdir = os.path.abspath(path), os.path.abspath(workdir)
    _check_new_workdir(workdir)
    hf, config, params = read_pretrained(path)
    tokenizer = MarianTokenizer.from_directory(path)
    if tokenizer.vocab_size != config.vocab_size or tokenizer.pad_id != config.pad_id:
        raise ConversionError(
            f"vocab.json has {tokenizer.vocab_size} entries and pad id {tokenizer.pad_id} but "
            f"config.json says vocab_size={config.vocab_size}, pad_token_id={config.pad_id}."
        )
    for key, want in (("decoder_start_token_id", tokenizer.pad_id),
                      ("eos_token_id", tokenizer.eos_id)):
        if hf.get(key, want) != want:
            raise ConversionError(
                f"config.json has {key}={hf[key]} but a work directory needs {want} (the "
                "vocabulary's pad / EOS); such a model can only be used with from_pretrained."
            )
    order = _id_order(tokenizer)
    config = config.replace(pad_id=0)
    tmp = f"{workdir}.importing-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_workdir(tmp, workdir, path, config, permute_vocab(params, order), tokenizer,
                       order)
        if os.path.isdir(workdir):
            os.rmdir(workdir)  # empty (checked above)
        os.replace(tmp, workdir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return workdir


def _write_workdir(tmp, workdir, path, config, params, tokenizer, order) -> None:
    proto = tokenizer.joint_model_proto(order)
    os.makedirs(os.path.join(tmp, os.path.dirname(TOKENIZER_FILE)))
    with open(os.path.join(tmp, TOKENIZER_FILE), "wb") as f:
        f.write(proto)
    marian_dir = os.path.join(tmp, MARIAN_DIR)
    tokenizer.save(marian_dir)
    for name in ("config.json",) + EXTRA_FILES:
        if os.path.isfile(os.path.join(path, name)):
            shutil.copyfile(os.path.join(path, name), os.path.join(marian_dir, name))
    for name, blob in ((ORDER_FILE, order), (MODEL_CONFIG_FILE, config.to_dict())):
        with open(os.path.join(marian_dir, name), "w", encoding="utf-8") as f:
            json.dump(blob, f, indent=1)
    meta = {
        "step": 0,
        "params_only": True,  # train.py starts a fine-tuning run from these weights
        "imported_from": path,
        "config": {"model": config.to_dict(), "model_kind": DEFAULT_MODEL_KIND},
        "tokenizer": {"path": os.path.join(workdir, TOKENIZER_FILE),
                      "sha256": hashlib.sha256(proto).hexdigest()},
    }
    save_params(os.path.join(tmp, CHECKPOINT_DIR), 0, params, meta)


def export_workdir(workdir: str, to: str, *, step: int | None = None) -> str:
    """Writes the newest (or ``step``) checkpoint of an imported — possibly fine-tuned — work
    directory as a Hugging Face Marian directory ``to`` (must be new or empty)."""
    workdir, to = os.path.abspath(workdir), os.path.abspath(to)
    marian_dir = os.path.join(workdir, MARIAN_DIR)
    if not os.path.isfile(os.path.join(marian_dir, ORDER_FILE)):
        raise ConversionError(
            f"{workdir} was not written by 'python -m transformer_jax.interop.marian import' "
            f"(no {MARIAN_DIR}/{ORDER_FILE}); only imported models can be exported."
        )
    if os.path.exists(to) and (not os.path.isdir(to) or os.listdir(to)):
        raise ConversionError(f"{to} already exists and is not empty; choose a new --to.")
    try:
        meta = read_meta(workdir, step)
    except FileNotFoundError as err:
        raise ConversionError(str(err)) from None
    config = ModelConfig.from_dict(meta["config"]["model"])
    with open(os.path.join(marian_dir, ORDER_FILE), encoding="utf-8") as f:
        order = json.load(f)
    tokenizer = MarianTokenizer.from_directory(marian_dir)
    params = load_params(workdir, meta["step"])
    if config.lora_rank:  # a LoRA fine-tuning: the adapters folded into the weights
        config, params = merge_lora(config, params)
    params = permute_vocab(params, np.argsort(order))
    with open(os.path.join(marian_dir, "config.json"), encoding="utf-8") as f:
        hf = json.load(f)
    tmp = f"{to}.exporting-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_pretrained(tmp, config.replace(pad_id=tokenizer.pad_id), params,
                        tokenizer=tokenizer, hf_config=hf, extra_dir=marian_dir)
        if os.path.isdir(to):
            os.rmdir(to)
        os.replace(tmp, to)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return to


# ----------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m transformer_jax.interop.marian",
        description="Convert Hugging Face Marian (OPUS-MT) models to and from work directories.")
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Marian directory -> new work directory")
    imp.add_argument("path", help="local Hugging Face Marian model directory")
    imp.add_argument("--workdir", required=True, help="work directory to create")
    exp = sub.add_parser("export", help="work directory -> new Marian directory")
    exp.add_argument("workdir", help="a work directory written by import (maybe fine-tuned)")
    exp.add_argument("--to", required=True, help="Marian directory to create")
    exp.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "import":
            out = import_workdir(args.path, args.workdir)
            print(f"imported {os.path.abspath(args.path)} into {out}; translate with: python -m "
                  f"transformer_jax.translate --workdir {out}")
        else:
            out = export_workdir(args.workdir, args.to, step=args.step)
            print(f"exported {os.path.abspath(args.workdir)} to {out}")
    except (ConversionError, TokenizerFilesError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0
