"""Helpers shared by the data tests (importable as ``data_helpers``)."""

from transformer_jax.data import default_data_config


def small_numbers_config(**overrides):
    """A numbers task small enough to prepare in well under a second."""
    cfg = default_data_config()
    cfg.numbers_max = 3000
    cfg.numbers_train_size = 600
    cfg.numbers_validation_size = 70
    cfg.numbers_test_size = 40
    cfg.vocab_size = 100
    cfg.max_length = 24
    cfg.update(overrides)
    return cfg
