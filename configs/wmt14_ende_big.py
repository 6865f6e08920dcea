"""WMT 2014 English -> German, Transformer big (paper table 3, 28.4 BLEU on newstest2014).

Same data, vocabulary, optimizer, schedule and batching as ``wmt14_ende_base.py`` (read its
docstring for the tokens-per-update arithmetic: 96 rows * grad_accum_steps 1 * 256 slots =
24,576 tokens a side; on fewer devices keep rows * accumulation at 96, e.g.
``--config.batch_size=12 --config.optimizer.grad_accum_steps=8``). Differences, as in the
paper: D 1024, 16 heads, F 4096, dropout 0.3 (EN-DE), 300,000 updates, and the last 20
checkpoints averaged (written every 10 minutes in the paper: about 600 updates at its 1.0 s
per update).

  python train.py --config configs/wmt14_ende_big.py --workdir runs/wmt14_big \\
      --config.data.data_dir=/data/tfds
"""

import importlib.util
import os


def _base_config():
    """``wmt14_ende_base.get_config()``, loaded by path (configs/ is not a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wmt14_ende_base.py")
    spec = importlib.util.spec_from_file_location("wmt14_ende_base", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    c = _base_config()
    c.num_train_steps = 300_000
    c.checkpoint_every_steps = 600
    c.keep_checkpoints = 20
    c.average_last = 20

    m = c.model
    m.d_model = 1024
    m.num_heads = 16
    m.d_ff = 4096
    m.dropout_rate = 0.3
    return c
