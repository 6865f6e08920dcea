"""Default run: a tiny Transformer on the built-in numbers task (English -> German words).

Offline, no downloads; trains in a few minutes on a laptop CPU.

  python train.py --config configs/default.py --workdir runs/demo
  python train.py --config configs/default.py --workdir runs/demo --config.num_train_steps=200

batch_size counts rows per update, summed over devices; a row holds data.max_length source
and data.max_length target tokens (several short pairs packed together).
"""

from transformer_jax.training import default_config


def get_config():
    c = default_config()
    c.seed = 0
    c.num_train_steps = 1500
    c.batch_size = 32
    c.log_every_steps = 50
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 2
    c.eval_metrics = "exact_match,chrf"  # single-word outputs: corpus BLEU is degenerate
    c.eval_num_sentences = 200

    c.data.source = "numbers"
    # Numbers below a million (German writes each as one word), drawn by digit class: 9,000
    # training pairs per class, so every number below 10,000 is in training (0-99 a hundred
    # times or more) and the larger classes give 9,000 numbers each (docs/training.md).
    c.data.numbers_max = 1_000_000
    c.data.numbers_train_size = 54_000
    c.data.vocab_size = 128
    c.data.tokenizer_model_type = "bpe"
    c.data.max_length = 32
    c.data.packing = True

    m = c.model
    m.d_model = 64
    m.num_heads = 4
    m.num_layers = 2
    m.d_ff = 256
    m.dropout_rate = 0.0
    m.max_len = 64

    o = c.optimizer
    o.name = "adam"
    o.schedule = "warmup_cosine"  # to 0 at the last update: the end is the best model
    o.learning_rate = 5e-3
    o.end_learning_rate = 0.0
    o.warmup_steps = 100
    o.label_smoothing = 0.1
    o.clip_norm = 1.0
    return c
