"""``python -m transformer_jax.interop.marian``: see :mod:`transformer_jax.interop.marian`."""

import sys

from transformer_jax.interop.marian.workdir import main

sys.exit(main())
