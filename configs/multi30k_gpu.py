"""Multi30k English -> German on one H100/H200 in about five minutes of training.

The CPU recipe of configs/multi30k.py (same data, tokenizer and model family), resized for one
GPU: bfloat16 compute (float32 master weights), jax.nn.dot_product_attention
(``attention_impl="jax"``: cuDNN fused attention on a GPU for bf16; attention dropout is off,
which that path needs), 384 packed rows of 64 tokens per update (~20k target-token slots), the
fused output projection + loss (``optimizer.loss_chunk``), and a schedule fitted to the clock:
``max_train_minutes=5`` with ``fit_steps_to_time`` (the trainer times the updates at the end of
the warm-up and sets the number of updates to what fits; the cosine decays to zero by then).
Validation BLEU (beam 4) on 200 ``val`` sentences every 500 updates; all of ``test2016`` at the
end.

  python train.py --config configs/multi30k_gpu.py --workdir runs/m30k_gpu
  bash bench/gpu_train.sh            # the same, with timing, translation and scoring

A wider model than the CPU config (D 512, 8 heads, 3+3 layers, F 2048): a GPU runs it at the
speed the CPU runs D 192. Nothing here has been tuned on a GPU yet; docs/accelerators.md
records what a run measured.
"""

import importlib.util
import os


def cpu_config():
    """configs/multi30k.py's config, loaded by path (config files are not a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multi30k.py")
    spec = importlib.util.spec_from_file_location("multi30k_cpu_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    c = cpu_config()
    c.num_train_steps = 20000  # an upper bound: fit_steps_to_time sets the count
    c.max_train_minutes = 5.0
    c.fit_steps_to_time = True
    c.batch_size = 384
    c.log_every_steps = 100
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 2

    m = c.model
    m.dtype = "bfloat16"
    m.attention_impl = "jax"  # cuDNN fused attention on a GPU (bf16, head dim 64)
    m.attention_dropout_rate = 0.0
    m.d_model = 512
    m.num_heads = 8
    m.num_layers = 3
    m.d_ff = 2048

    o = c.optimizer
    o.learning_rate = 1e-3
    o.warmup_steps = 300
    o.weight_decay = 0.1
    o.loss_chunk = 2048
    return c
