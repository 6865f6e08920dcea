"""Evaluation during and after training: teacher-forced loss/accuracy and decoding metrics.

``Evaluator.evaluate(params, split, num_sentences)`` returns

  loss, nll, accuracy, perplexity   over every target token of the split (data parallel)
  bleu, chrf, exact_match           on the first ``num_sentences`` sentences (-1: all),
                                    decoded greedily or with beam search; scores from
                                    sacrebleu, exact_match in percent
  exact_match_<magnitude>           with exact_match, when the examples carry a number
                                    (``PairSource.values``, e.g. the numbers task): exact
                                    match per magnitude bucket (0-9, 10-99, ..., 10000-up)

Decoding is split like the loss pass: global eval batch ``b`` holds sentences
``b * batch_size + [0, batch_size)``, each process decodes its block of rows of it, spread
over its local devices (``shard_map``, no communication inside), and the token ids (fixed
shape) are gathered from every process, so every process computes the same strings and
metrics with ``1 / process_count`` of the decoding work. Batches have a fixed shape
``[rows, max_length]`` so decoding compiles once.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from transformer_jax import data as data_lib
from transformer_jax.checkpoints import average_into_workdir, load_params
from transformer_jax.inference import make_translate_fn
from transformer_jax.metrics import corpus_scores, exact_match_by_magnitude
from transformer_jax.nn import ModelDef
from transformer_jax.parallel import Strategy, ordered_mesh, to_local
from transformer_jax.training.build import Run

__all__ = ["Evaluator", "assemble_translations", "final_evaluation", "split_rows", "ROWS"]

ROWS = "rows"  # mesh axis of the decoding devices


def assemble_translations(index: np.ndarray, ids: np.ndarray, limit: int,
                          tokenizer) -> tuple[list[int], list[str]]:
    """Decoded rows of every process -> sentences ``0 .. limit-1`` in order.

    Args:
      index: int ``[M]`` sentence index of each row (-1 or ``>= limit``: not wanted).
      ids: int ``[M, T]`` decoded token ids of each row.
      limit: how many leading sentences were asked for.
      tokenizer: turns ids into text.

    Returns:
      ``(indices, hypotheses)``: ``indices == [0, ..., limit - 1]`` and their texts.

    Raises:
      ValueError: a wanted sentence is missing or decoded twice.
    """
    keep = (index >= 0) & (index < limit)
    order = np.argsort(index[keep], kind="stable")
    indices = index[keep][order]
    if not np.array_equal(indices, np.arange(limit)):
        raise ValueError(f"decoded rows cover sentences {indices.tolist()[:10]}..., not each of "
                         f"0..{limit - 1} once; every process must decode the same batches.")
    return indices.tolist(), tokenizer.decode(ids[keep][order])


def split_rows(decode_fn, devices) -> tuple:
    """``decode_fn(params, rows [R, ...]) -> [R, ...]`` jitted over ``devices``: params
    replicated, the rows split evenly (R a multiple of the device count), no communication.

    Returns ``(jitted_fn, mesh)``; place rows with ``NamedSharding(mesh, P("rows"))``.
    """
    mesh = ordered_mesh((len(devices),), (ROWS,), devices, jax.sharding.AxisType.Explicit)
    return jax.jit(jax.shard_map(decode_fn, mesh=mesh, in_specs=(P(), P(ROWS)),
                                 out_specs=P(ROWS), check_vma=False)), mesh


class Evaluator:
    """Evaluates params on the splits of a prepared dataset.

    Args:
      strategy: the run's parallelism strategy (the loss pass runs as training does).
      model_def: static model definition.
      prepared: ``transformer_jax.data.prepare(...)`` result.
      loss_step: compiled ``(params, batch) -> summed metrics`` (``Run.eval_step``, or
        ``strategy.compile_eval_step`` of ``training.step.eval_step``).
      select: keeps the batch arrays the model reads (``Run.select``; default: all but the
        sentence index).
      batch_size: global rows per evaluation batch.
      metric_names: subset of ("bleu", "chrf", "exact_match").
      beam_size, length_penalty: decoding settings.
    """

    def __init__(self, strategy: Strategy, model_def: ModelDef, prepared, *,
                 loss_step: Callable, select: Callable | None = None, batch_size: int,
                 metric_names=(), beam_size: int = 1, length_penalty: float = 0.6):
        self.strategy, self.prepared = strategy, prepared
        self.batch_size = batch_size
        self.metric_names = tuple(metric_names)
        self._loss_fn = loss_step
        self._select = select or (lambda batch: {k: v for k, v in batch.items()
                                                 if k != "index"})
        self._translate = make_translate_fn(
            model_def, max_length=prepared.max_length, beam_size=beam_size,
            length_penalty=length_penalty)
        self._references: dict[str, list[tuple[str, str]]] = {}
        self._values: dict[str, np.ndarray | None] = {}
        self._sharded_translate = None  # (jitted decode, mesh), built on first use

    @classmethod
    def for_run(cls, run: Run, prepared, *, batch_size: int, metric_names=()) -> Evaluator:
        """The evaluator of a training run (its strategy, model, loss step, beam settings)."""
        return cls(run.strategy, run.model_def, prepared, loss_step=run.eval_step,
                   select=run.select, batch_size=batch_size, metric_names=metric_names,
                   beam_size=run.config.eval_beam_size,
                   length_penalty=run.config.eval_length_penalty)

    def _batches(self, split: str):
        """This process's rows of each global eval batch: the driver's row block (processes
        that share a block, e.g. a tensor axis across processes, load the same rows)."""
        index, count = self.strategy.data_shard()
        return data_lib.eval_batches(self.prepared, split, self.batch_size,
                                     process_index=index, process_count=count)

    def loss(self, params, split: str) -> dict[str, float]:
        """Token-level loss/NLL/accuracy/perplexity over the whole split."""
        placed = self.strategy.put_state(params)
        totals: dict[str, float] = {}
        for batch in self._batches(split):
            batch = self.strategy.put_batch(self._select(batch))
            sums = self.strategy.metrics(self._loss_fn(placed, batch))
            for key, value in sums.items():
                totals[key] = totals.get(key, 0.0) + value
        weight = max(totals.get("weight_sum", 0.0), 1.0)
        nll = totals.get("nll_sum", 0.0) / weight
        return {
            "loss": totals.get("loss_sum", 0.0) / weight,
            "nll": nll,
            "accuracy": totals.get("correct_sum", 0.0) / weight,
            "perplexity": math.exp(min(nll, 50.0)),
        }

    def _decoder(self, params):
        """(translate over this process's decoding devices, params replicated on them, devices)."""
        if self._sharded_translate is None:
            local = [d for d in self.strategy.devices
                     if d.process_index == jax.process_index()]
            self._sharded_translate = split_rows(self._translate, local)
        translate, mesh = self._sharded_translate
        params = jax.device_put(to_local(params), NamedSharding(mesh, P()))
        return translate, params, mesh

    def decode_local(self, params, split: str, limit: int, *, process_index: int | None = None,
                     process_count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """This process's rows of the global eval batches that hold sentences ``[0, limit)``.

        Returns:
          ``(index [M], ids [M, max_length])``: sentence index of each row (-1 for filler) and
          its decoded ids; ``M = ceil(limit / batch_size) * batch_size / process_count``.
        """
        translate, params, mesh = self._decoder(params)
        rows_sharding = NamedSharding(mesh, P(ROWS))
        batches = data_lib.eval_batches(self.prepared, split, self.batch_size,
                                        process_index=process_index,
                                        process_count=process_count)
        index, ids = [], []
        for b in range(-(-limit // self.batch_size)):
            batch = batches[b]
            rows = len(batch["index"])
            src = np.zeros((-(-rows // mesh.size) * mesh.size, self.prepared.max_length),
                           np.int32)
            src[:rows] = batch["inputs"]  # [R', S] padded to a multiple of the devices
            out = translate(params, jax.device_put(src, rows_sharding))  # [R', T]
            index.append(np.asarray(batch["index"]))  # [R]
            ids.append(np.asarray(out)[:rows])  # [R, T]
        return np.concatenate(index), np.concatenate(ids)

    def translations(self, params, split: str, num_sentences: int) -> tuple[list, list, list]:
        """Decode the first ``num_sentences`` (-1: all) of ``split`` (split over processes).

        All processes must call this together; they all get the same result.

        Returns:
          ``(indices, hypotheses, references)`` aligned lists.
        """
        if split not in self._references:
            self._references[split] = data_lib.raw_pairs(self.prepared, split)
        pairs = self._references[split]
        limit = len(pairs) if num_sentences < 0 else min(num_sentences, len(pairs))
        if limit == 0:
            return [], [], []
        index, ids = self.decode_local(params, split, limit)
        if jax.process_count() > 1:  # [P, M] and [P, M, T]: every process's rows
            index = np.asarray(multihost_utils.process_allgather(index)).reshape(-1)
            ids = np.asarray(multihost_utils.process_allgather(ids)).reshape(len(index), -1)
        indices, hyps = assemble_translations(index, ids, limit, self.prepared.tokenizer)
        return indices, hyps, [pairs[i][1] for i in indices]

    def evaluate(self, params, split: str, num_sentences: int) -> dict[str, float]:
        """Loss metrics on the split and decoding metrics on its first sentences."""
        metrics = self.loss(params, split)
        if self.metric_names and num_sentences != 0:
            indices, hyps, refs = self.translations(params, split, num_sentences)
            metrics.update(corpus_scores(hyps, refs, self.metric_names))
            if "exact_match" in self.metric_names and hyps:
                if split not in self._values:
                    self._values[split] = self.prepared.source(split).values()
                values = self._values[split]
                if values is not None:
                    metrics.update(exact_match_by_magnitude(hyps, refs, values[indices]))
            metrics["num_sentences"] = float(len(hyps))
        return metrics


def final_evaluation(config, workdir, run_eval, checkpointer) -> dict:
    """Test-split metrics on all its sentences; the same for the average of the last
    ``config.average_last`` checkpoints (written into ``<workdir>/averaged``)."""
    out: dict = {}
    test_split = config.data.test_split
    if test_split:
        out["test"] = run_eval(test_split, -1)
    if config.average_last > 1 and len(checkpointer.all_steps()) > 1:
        path, steps = average_into_workdir(workdir, config.average_last)
        out["averaged"] = {"steps": steps, "path": path}
        if test_split:
            params = load_params(path)
            out["averaged"]["test"] = run_eval(test_split, -1, params=params,
                                               tag=f"{test_split}_averaged")
    return out
