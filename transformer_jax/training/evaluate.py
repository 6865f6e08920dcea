"""Evaluation during and after training: teacher-forced loss/accuracy and decoding metrics.

``Evaluator.evaluate(params, split, num_sentences)`` returns

  loss, nll, accuracy, perplexity   over every target token of the split (data parallel)
  bleu, chrf, exact_match           on the first ``num_sentences`` sentences (-1: all),
                                    decoded greedily or with beam search on one device;
                                    scores from sacrebleu, exact_match in percent

Decoding runs in fixed-shape batches ``[batch_size, max_length]`` so it compiles once.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax import data as data_lib
from transformer_jax.inference import corpus_scores, make_translate_fn
from transformer_jax.training.distributed import to_local
from transformer_jax.training.parallel import DataParallel
from transformer_jax.training.step import ModelDef, eval_step

__all__ = ["Evaluator", "corpus_scores", "make_translate_fn"]


class Evaluator:
    """Evaluates params on the splits of a prepared dataset.

    Args:
      dp: the run's :class:`DataParallel` (the loss pass is data parallel).
      model_def: static model definition.
      prepared: ``transformer_jax.data.prepare(...)`` result.
      label_smoothing: eps for the reported (smoothed) loss; ``nll`` is unsmoothed.
      batch_size: global rows per evaluation batch.
      metric_names: subset of ("bleu", "chrf", "exact_match").
      beam_size, length_penalty: decoding settings.
    """

    def __init__(self, dp: DataParallel, model_def: ModelDef, prepared, *,
                 label_smoothing: float, batch_size: int, metric_names=(),
                 beam_size: int = 1, length_penalty: float = 0.6, pad_id: int = 0):
        self.dp, self.prepared = dp, prepared
        self.batch_size = batch_size
        self.metric_names = tuple(metric_names)
        self._loss_fn = dp.eval_step(functools.partial(
            eval_step, model_def=model_def, label_smoothing=label_smoothing, pad_id=pad_id))
        self._translate = make_translate_fn(
            model_def, max_length=prepared.max_length, beam_size=beam_size,
            length_penalty=length_penalty)
        self._references: dict[str, list[tuple[str, str]]] = {}

    def _batches(self, split: str):
        return data_lib.eval_batches(self.prepared, split, self.batch_size)

    def loss(self, params, split: str) -> dict[str, float]:
        """Token-level loss/NLL/accuracy/perplexity over the whole split."""
        placed = self.dp.put_state(params)
        totals: dict[str, float] = {}
        for batch in self._batches(split):
            batch = {k: v for k, v in batch.items() if k != "index"}
            sums = self.dp.metrics(self._loss_fn(placed, self.dp.put_batch(batch)))
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

    def translations(self, params, split: str, num_sentences: int) -> tuple[list, list, list]:
        """Decode the first ``num_sentences`` (-1: all) of ``split`` on this process.

        Returns:
          ``(indices, hypotheses, references)`` aligned lists.
        """
        if split not in self._references:
            self._references[split] = data_lib.raw_pairs(self.prepared, split)
        pairs = self._references[split]
        limit = len(pairs) if num_sentences < 0 else min(num_sentences, len(pairs))
        if limit == 0:
            return [], [], []
        params = to_local(params)  # one device; global (multi-process) arrays too
        local = self.batch_size // jax.process_count()
        ds = data_lib.eval_batches(self.prepared, split, local, process_index=0, process_count=1)
        indices, hyps = [], []
        for batch in ds:
            index = np.asarray(batch["index"])  # [rows]
            ids = np.asarray(self._translate(params, jnp.asarray(batch["inputs"])))
            texts = self.prepared.tokenizer.decode(ids)
            for i, text in zip(index.tolist(), texts, strict=True):
                if 0 <= i < limit:
                    indices.append(i)
                    hyps.append(text)
            if index.max() >= limit - 1 or index.min() < 0:
                break
        refs = [pairs[i][1] for i in indices]
        return indices, hyps, refs

    def evaluate(self, params, split: str, num_sentences: int) -> dict[str, float]:
        """Loss metrics on the split and decoding metrics on its first sentences."""
        metrics = self.loss(params, split)
        if self.metric_names and num_sentences != 0:
            _, hyps, refs = self.translations(params, split, num_sentences)
            metrics.update(corpus_scores(hyps, refs, self.metric_names))
            metrics["num_sentences"] = float(len(hyps))
        return metrics
