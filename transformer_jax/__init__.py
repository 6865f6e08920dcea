"""transformer_jax."""
