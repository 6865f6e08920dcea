"""Multi30k English -> German (29,000 training pairs) on a CPU in about an hour.

Reads aligned text files ``{train,val,test2016}.{en,de}`` from ``data.path`` (Multi30k is for
research/education use; get it from https://github.com/multi30k/dataset, task 1, and point
``--config.data.path`` at the folder). Text is used as is (cased, with punctuation); the
tokenizer is one 6000-piece SentencePiece model shared by both languages.

  python train.py --config configs/multi30k.py --workdir runs/multi30k
  python train.py --config configs/multi30k.py --workdir runs/m30k \\
      --config.data.path=/data/multi30k --config.num_train_steps=200 \\
      --config.optimizer.warmup_steps=50                                  # a short try

The settings are sized for about an hour on 2 CPU cores; why each was chosen, with the runs
that compared them, is in docs/training.md ("Multi30k: measured"). A shallow model of moderate
width: D 192, 4 heads, 3+3 layers, F 768, one 6,000-piece vocabulary (4.3M parameters).
Batches of 40 packed rows of 64 tokens. The run is sized by the clock, not by a step count:
``max_train_minutes=55`` (set-up included) with ``fit_steps_to_time``, so at the end of the
400-update warm-up the trainer times the updates and sets the number of updates to what fits
(at most ``num_train_steps=10000``). The learning rate warms up to 2e-3 and decays to zero
along a cosine by that last update, so the final weights are annealed on any machine
(checkpoint averaging is off; set ``average_last`` to try it). AdamW's decoupled weight decay
of 1.0 regularises the small corpus, with dropout 0.1. ``summary.json`` reports the fitted
``num_train_steps``; rerun with ``--config.fit_steps_to_time=false --config.num_train_steps=N``
to repeat a run without the clock. Nothing here is specific to English-German: for another
pair of similar size (10k-100k sentence pairs) set ``data.path``, ``data.source_lang`` and
``data.target_lang``.
Evaluation: BLEU and chrF (sacrebleu) with beam search (beam 4, length penalty 0.6) on 200
``val`` sentences every 1,000 updates, and on all of ``test2016`` at the end.
"""

from transformer_jax.training import default_config


def get_config():
    c = default_config()
    c.seed = 0
    c.num_train_steps = 10000  # an upper bound: fit_steps_to_time sets the count
    # Train for 55 minutes (set-up included; the final test2016 evaluation comes after), with
    # the schedule fitted to them at the end of the warm-up.
    c.max_train_minutes = 55.0
    c.fit_steps_to_time = True
    c.batch_size = 40
    c.log_every_steps = 50
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 5
    c.average_last = 0  # no checkpoint averaging with this annealed schedule
    c.eval_metrics = "bleu,chrf"
    c.eval_num_sentences = 200
    c.eval_beam_size = 4
    c.eval_length_penalty = 0.6

    d = c.data
    d.source = "text"
    d.path = "../shared/data/multi30k"
    d.source_lang = "en"
    d.target_lang = "de"
    d.train_split = "train"
    d.eval_split = "val"
    d.test_split = "test2016"
    d.vocab_size = 6000
    d.tokenizer_model_type = "unigram"
    d.max_length = 64  # the longest Multi30k sentence has 39 words
    d.packing = True

    m = c.model
    m.d_model = 192
    m.num_heads = 4
    m.num_layers = 3
    m.d_ff = 768
    m.dropout_rate = 0.1
    m.attention_dropout_rate = 0.0
    m.max_len = 128
    m.share_embeddings = True
    m.tie_output = True

    o = c.optimizer
    o.name = "adamw"  # decoupled weight decay
    o.weight_decay = 1.0  # on matrices and embeddings; biases and LayerNorms are not decayed
    o.b1, o.b2, o.eps = 0.9, 0.98, 1e-9
    o.schedule = "warmup_cosine"
    o.learning_rate = 2e-3
    o.warmup_steps = 400
    o.end_learning_rate = 0.0
    o.clip_norm = 1.0
    o.label_smoothing = 0.1
    return c
