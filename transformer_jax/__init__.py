"""transformer_jax: the Transformer of "Attention Is All You Need" in JAX and Flax NNX.

Import what you need from the layer you need; this package imports nothing itself, so
``from transformer_jax import ops`` does not pull in Flax, Optax or Orbax.

Layers (lower never imports higher; checked by ``lint-imports``, see ``pyproject.toml``)::

    ops, config       pure functions; the frozen ModelConfig
    nn                Flax NNX modules; build_model / split_model
    decoding          greedy / beam / sampling over an explicit cache (knows no model)
    checkpoints       reading trained work directories (meta, params, tokenizer)
    inference         load(workdir), Translator, attention maps, sacreBLEU
    generation        Generator, make_generate_fn (decoder-only sampling)
    training          config defaults + validation, optimizer, steps, parallelism, loop
    translate         the command-line translator (train.py at the repository root)

``data`` (sources, tokenizer, grain pipeline) depends on none of the model code.
"""
