"""Shared fixtures: a small numbers-task dataset and tokenizer, prepared once per session."""

import pytest
import tensorflow_datasets as tfds
from helpers import small_numbers_config

from transformer_jax.data import prepare

tfds.disable_progress_bar()


@pytest.fixture(scope="session")
def numbers_workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("numbers_workdir"))


@pytest.fixture(scope="session")
def prepared_numbers(numbers_workdir):
    return prepare(small_numbers_config(), numbers_workdir)
