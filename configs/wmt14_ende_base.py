"""WMT 2014 English -> German, Transformer base: the recipe of Vaswani et al. (2017).

Data: the TFDS catalogue dataset ``wmt14_translate/de-en`` (4.5M pairs; validation is
newstest2013, test newstest2014), prepared once into ``data.data_dir`` (TFDS downloads the raw
corpora on first use, several GB). One shared 37,000-piece BPE vocabulary (SentencePiece,
trained on 1M sampled training pairs).

  python train.py --config configs/wmt14_ende_base.py --workdir runs/wmt14_base \\
      --config.data.data_dir=/data/tfds

Paper recipe (section 5): Adam(b1 0.9, b2 0.98, eps 1e-9); learning rate
``d_model^-0.5 * min(step^-0.5, step * 4000^-1.5)``; label smoothing 0.1; dropout 0.1;
100,000 updates; average of the last 5 checkpoints (written every 10 minutes in the paper);
beam search with beam 4 and length penalty alpha 0.6.

Tokens per update (paper: ~25,000 source + ~25,000 target tokens): an update sees
``batch_size * optimizer.grad_accum_steps`` rows of ``data.max_length`` token slots per side,
several sentence pairs packed into each row. Here 96 rows * 1 * 256 = 24,576 slots per side;
packing leaves a few percent empty, so the real count is a little lower (``tokens`` in
``history.jsonl`` is the exact per-update number). With 8 accelerators each device takes 12
rows. Where memory or devices are fewer, keep rows * accumulation at 96, e.g.
``--config.batch_size=24 --config.optimizer.grad_accum_steps=4`` (24 * 4 * 256 = 24,576) or
``--config.batch_size=8 --config.optimizer.grad_accum_steps=12``. Checkpoints every 1,500
updates approximate the paper's 10 minutes at its 0.4 s per update.
"""

from transformer_jax.training import default_config

ROWS_PER_UPDATE = 96
MAX_LENGTH = 256


def get_config():
    c = default_config()
    c.seed = 0
    c.num_train_steps = 100_000
    c.batch_size = ROWS_PER_UPDATE
    c.log_every_steps = 100
    c.eval_every_steps = 5_000
    c.checkpoint_every_steps = 1_500
    c.keep_checkpoints = 5
    c.average_last = 5
    c.eval_metrics = "bleu,chrf"
    c.eval_num_sentences = 500
    c.eval_beam_size = 4
    c.eval_length_penalty = 0.6

    d = c.data
    d.source = "tfds"
    d.tfds_name = "wmt14_translate/de-en"
    d.source_lang = "en"
    d.target_lang = "de"
    d.train_split = "train"
    d.eval_split = "validation"
    d.test_split = "test"
    d.vocab_size = 37_000
    d.tokenizer_model_type = "bpe"
    d.tokenizer_sample_size = 1_000_000
    d.max_length = MAX_LENGTH
    d.packing = True

    m = c.model
    m.d_model = 512
    m.num_heads = 8
    m.num_layers = 6
    m.d_ff = 2048
    m.dropout_rate = 0.1
    m.attention_dropout_rate = 0.0
    m.max_len = MAX_LENGTH
    m.positional = "sinusoidal"
    m.pre_norm = False
    m.share_embeddings = True
    m.tie_output = True

    o = c.optimizer
    o.name = "adam"
    o.b1, o.b2, o.eps = 0.9, 0.98, 1e-9
    o.schedule = "paper"
    o.learning_rate = 1.0  # the factor in front of d_model^-0.5 * min(...)
    o.warmup_steps = 4_000
    o.clip_norm = 0.0
    o.grad_accum_steps = 1
    o.label_smoothing = 0.1
    return c
