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
from transformer_jax import decoding
from transformer_jax.data.tokenizer import EOS_ID
from transformer_jax.training.parallel import DataParallel
from transformer_jax.training.step import ModelDef, eval_step

__all__ = ["Evaluator", "corpus_scores", "make_translate_fn"]


def corpus_scores(hypotheses: list[str], references: list[str], names) -> dict[str, float]:
    """sacrebleu corpus BLEU / chrF and exact-match rate (all 0-100) of aligned lists."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} references; they must align."
        )
    out: dict[str, float] = {}
    if not hypotheses:
        return out
    if "bleu" in names:
        out["bleu"] = float(sacrebleu.corpus_bleu(hypotheses, [references]).score)
    if "chrf" in names:
        out["chrf"] = float(sacrebleu.corpus_chrf(hypotheses, [references]).score)
    if "exact_match" in names:
        same = sum(h.strip() == r.strip() for h, r in zip(hypotheses, references, strict=True))
        out["exact_match"] = 100.0 * same / len(hypotheses)
    return out


def make_translate_fn(model_def: ModelDef, *, max_length: int, beam_size: int = 1,
                      length_penalty: float = 0.6):
    """Jitted ``translate(params, src_ids [B, S]) -> ids [B, max_length]`` (EOS-terminated).

    Greedy search for ``beam_size == 1``, else the best beam of ``beam_search``.
    """

    def translate(params, src_ids):
        model = model_def.merge(params)
        batch = src_ids.shape[0]
        encoded = model.encode(src_ids)  # [B, S, D]
        cache = model.init_cache(batch, max_length, encoded=encoded, src_ids=src_ids)

        def tokens_to_logits(ids, cache):  # ids [B', 1]
            logits, cache = model.decode(None, None, ids, cache=cache)  # [B', 1, V]
            return logits[:, 0, :], cache

        if beam_size == 1:
            out = decoding.greedy_search(
                cache, tokens_to_logits, batch_size=batch, max_len=max_length, eos_id=EOS_ID
            )
        else:
            out = decoding.beam_search(
                cache, tokens_to_logits, batch_size=batch, beam_size=beam_size,
                max_len=max_length, eos_id=EOS_ID, alpha=length_penalty,
            )[0][:, 0]
        return out

    return jax.jit(translate)


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
        params = jax.device_put(params, jax.local_devices()[0])
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
