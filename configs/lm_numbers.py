"""Decoder-only language model on the built-in numbers task: German number words.

The model is ``transformer_jax.nn.DecoderOnlyLM`` trained with the same loop, optimizer and
checkpoints as the translation model; it reads the target side (``data.target_lang``) of the
pairs, packed several per row with segment masks. Offline, a few minutes on a laptop CPU.

  python train.py --config configs/lm_numbers.py --workdir runs/lm
  python train.py --config configs/lm_numbers.py --workdir runs/lm --config.num_train_steps=200

Sample from the trained model (see docs/scaling.md)::

  from transformer_jax.inference import load
  load("runs/lm").generate(["drei"], max_new_tokens=16, temperature=0.0)
"""

from transformer_jax.training import default_config


def get_config():
    c = default_config()
    c.model_kind = "decoder_only"
    c.seed = 0
    c.num_train_steps = 1000
    c.batch_size = 32
    c.log_every_steps = 50
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 2
    c.eval_metrics = ""  # no translations: loss / perplexity only
    c.eval_num_sentences = 0

    c.data.source = "numbers"
    c.data.numbers_max = 1_000_000
    c.data.vocab_size = 256
    c.data.max_length = 32
    c.data.packing = True

    m = c.model
    m.d_model = 64
    m.num_heads = 4
    m.num_layers = 2  # decoder layers of the LM
    m.d_ff = 256
    m.dropout_rate = 0.0
    m.max_len = 64

    o = c.optimizer
    o.name = "adam"
    o.schedule = "warmup_rsqrt"
    o.learning_rate = 3e-3
    o.warmup_steps = 200
    o.label_smoothing = 0.0
    o.clip_norm = 1.0
    return c
