"""``python -m transformer_jax.aot``: see :mod:`transformer_jax.aot`."""

import sys

from transformer_jax.aot.cli import main

sys.exit(main())
