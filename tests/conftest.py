"""Shared fixtures: one tiny model per test session, made offline."""

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama model whose tokenizer knows every word of the synthetic data."""
    from derta.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from derta.models import load_tokenizer

    return load_tokenizer(str(tiny_dir))


@pytest.fixture(scope="session")
def synthetic():
    from derta.synthetic import make_data

    return make_data(seed=0)
