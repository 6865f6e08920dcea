"""``data.*`` configuration keys and their defaults (one line each)."""

from __future__ import annotations

import os

import ml_collections

from transformer_jax.data.preprocess import Preprocessor

__all__ = ["default_data_config", "check_data_config"]

SOURCES = ("numbers", "text", "tfds")
MODEL_TYPES = ("unigram", "bpe")


def default_num_workers() -> int:
    """The CPUs this process may use, at most 8 (``data.num_workers``' default)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def default_data_config() -> ml_collections.ConfigDict:
    """Every ``data.*`` key with its default; ``configs/*.py`` start from this and override."""
    c = ml_collections.ConfigDict()
    # Where the pairs come from: "numbers" (built-in offline task), "text" (aligned files in
    # data.path) or "tfds" (TFDS catalogue dataset data.tfds_name).
    c.source = "numbers"
    c.path = ""  # text: directory with {split}.{source_lang} / {split}.{target_lang} files.
    c.source_lang = "en"  # language code / feature name of the source side.
    c.target_lang = "de"  # language code / feature name of the target side.
    c.train_split = "train"  # split used for training and for training the tokenizer.
    c.eval_split = "validation"  # split evaluated during training (Multi30k: "val").
    c.test_split = "test"  # split for the final evaluation ("" for none; Multi30k: "test2016").
    c.tfds_name = ""  # tfds: catalogue name, e.g. "wmt14_translate/de-en".
    c.data_dir = ""  # where prepared TFDS array_record data lives; "" = <workdir>/data.
    # Tokenizer: joint SentencePiece model on source + target of the training split, stored at
    # <workdir>/tokenizer/spm.model and reused when present.
    c.vocab_size = 256  # pieces incl. pad=0, eos=1, unk=2 (numbers task needs few pieces).
    c.tokenizer_model_type = "unigram"  # "unigram" or "bpe".
    c.tokenizer_sample_size = 1_000_000  # at most this many training pairs feed the tokenizer.
    c.tokenizer_character_coverage = 1.0  # share of characters kept (0.9995 for CJK scripts).
    c.tokenizer_seed = 0  # seed of the pair sample used to train the tokenizer.
    # Subword regularisation (unigram only): > 0 segments each training sentence, every epoch,
    # by one of its subword_sampling_nbest best segmentations drawn with probability
    # proportional to P ** alpha (0 = off: always the best, as evaluation and translate do).
    c.subword_sampling_alpha = 0.0
    c.subword_sampling_nbest = 16  # candidates per sentence (cost grows with it).
    # Preprocessing (data/preprocess.py), applied to every pair read and, by translate, to its
    # input: the same text normalisation at training and at translation time.
    c.lowercase = False  # lower-case source and target (the model then writes lowercase).
    c.unicode_normalization = ""  # "", "NFC", "NFKC", "NFD" or "NFKD".
    c.normalize_punctuation = False  # Moses punctuation normalisation (sacremoses).
    c.max_length_ratio = 0.0  # drop training pairs with a token-length ratio above this (0 = off).
    # Pipeline.
    c.max_length = 32  # tokens per row incl. EOS; longer training pairs are dropped, eval trims.
    c.packing = True  # pack several training pairs per row (segment ids 1..k) or pad one per row.
    # Rows each row stream fills at once, first fit (more = less padding; Multi30k fill 0.83
    # with 1, 0.88 with 4, 0.90 with 8).
    c.packing_bins_per_row = 4
    c.prefetch_batches = 2  # batches prepared ahead in a background thread (0 = off).
    # Worker processes segmenting text for subword sampling (the only per-example work left
    # once token ids are cached); 0 = in the main process. Batches do not depend on it.
    c.num_workers = default_num_workers()
    # Numbers task ("numbers" source): numbers from range(numbers_max), each split drawn with
    # an equal share per digit class (0-9, 10-99, ...); see data/numbers.py, split_numbers.
    c.numbers_max = 100_000  # exclusive upper end of the number range (at most 1_000_000).
    c.numbers_train_size = 40_000  # training pairs (a class smaller than its share repeats).
    c.numbers_validation_size = 1_000  # validation pairs (distinct numbers).
    c.numbers_test_size = 1_000  # test pairs (distinct numbers, none in validation).
    c.numbers_seed = 0  # seed of the draws that assign numbers to splits.
    return c


def check_data_config(c) -> None:
    """Raises ValueError naming the first ``data.*`` value that cannot work."""
    if c.source not in SOURCES:
        raise ValueError(f"data.source={c.source!r} must be one of {SOURCES}.")
    if c.tokenizer_model_type not in MODEL_TYPES:
        raise ValueError(
            f"data.tokenizer_model_type={c.tokenizer_model_type!r} must be one of {MODEL_TYPES}."
        )
    if c.vocab_size < 4:
        raise ValueError(f"data.vocab_size={c.vocab_size} must be at least 4 (pad, eos, unk, +1).")
    if c.max_length < 2:
        raise ValueError(f"data.max_length={c.max_length} must be at least 2 (one token + EOS).")
    if c.tokenizer_sample_size < 1:
        raise ValueError(f"data.tokenizer_sample_size={c.tokenizer_sample_size} must be >= 1.")
    if not c.train_split or not c.eval_split:
        raise ValueError("data.train_split and data.eval_split must name splits of the dataset.")
    if c.subword_sampling_alpha < 0:
        raise ValueError(f"data.subword_sampling_alpha={c.subword_sampling_alpha} must be >= 0.")
    if c.subword_sampling_alpha > 0:
        if c.tokenizer_model_type != "unigram":
            raise ValueError("data.subword_sampling_alpha > 0 needs "
                             "data.tokenizer_model_type='unigram' (BPE has no n-best list).")
        if c.subword_sampling_nbest < 2:
            raise ValueError(f"data.subword_sampling_nbest={c.subword_sampling_nbest} must be "
                             ">= 2 for subword sampling.")
    Preprocessor.from_config(c)  # unicode_normalization / max_length_ratio
    workers = c.get("num_workers", 0)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"data.num_workers={workers!r} must be an integer >= 0 (0 segments "
                         "text in the main process).")
    if c.packing_bins_per_row < 1:
        raise ValueError(f"data.packing_bins_per_row={c.packing_bins_per_row} must be >= 1.")
