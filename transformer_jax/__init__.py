"""transformer_jax: the Transformer of "Attention Is All You Need" in JAX and Flax NNX.

Import what you need from the layer you need; this package imports nothing itself, so
``from transformer_jax import ops`` does not pull in Flax, Optax or Orbax.

Layers (lower never imports higher; checked by ``lint-imports``, see ``pyproject.toml``)::

    ops               pure functions (attention, masks, positions, losses)
    config            the frozen ModelConfig
    nn                Flax NNX modules; every model answers model(batch); build_model
    parallel          parallelism strategies (none, pmap, shard_map, mesh); several processes
    decoding          greedy / beam / sampling over an explicit cache (knows no model)
    checkpoints       work directories: reading and writing checkpoints
    inference         load(workdir), Translator, Generator, attention maps, sacreBLEU
    training          config + validation, optimizer, steps, build_run, the loop and its hooks
    translate, aot    the command-line translator; compiling for accelerators ahead of time

``data`` (sources, tokenizer, grain pipeline) depends on none of the model code.
"""
