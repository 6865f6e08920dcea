"""Decoder-only language model on text files: the ``data.target_lang`` side of a text dataset.

Reads ``{split}.{source_lang}`` / ``{split}.{target_lang}`` from ``data.path`` like
``configs/multi30k.py`` (the tokenizer is trained on both files; the model only sees the
target side, one sentence per segment, packed several per row). For a single-language corpus
give the same file twice: ``--config.data.source_lang=de --config.data.target_lang=de``.

  python train.py --config configs/lm_text.py --workdir runs/lm_text \\
      --config.data.path=/data/multi30k
"""

from transformer_jax.training import default_config


def get_config():
    c = default_config()
    c.model_kind = "decoder_only"
    c.seed = 0
    c.num_train_steps = 2000
    c.batch_size = 32
    c.log_every_steps = 50
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 2
    c.eval_metrics = ""  # perplexity only
    c.eval_num_sentences = 0

    c.data.source = "text"
    c.data.path = "../shared/data/multi30k"
    c.data.source_lang = "en"
    c.data.target_lang = "de"  # the language modelled
    c.data.train_split, c.data.eval_split, c.data.test_split = "train", "val", "test2016"
    c.data.vocab_size = 8000
    c.data.max_length = 64
    c.data.packing = True

    m = c.model
    m.d_model = 256
    m.num_heads = 4
    m.num_layers = 4
    m.d_ff = 1024
    m.dropout_rate = 0.1
    m.max_len = 128

    o = c.optimizer
    o.name = "adamw"
    o.schedule = "warmup_cosine"
    o.learning_rate = 1e-3
    o.warmup_steps = 300
    o.weight_decay = 0.01
    o.label_smoothing = 0.0
    o.clip_norm = 1.0
    return c
