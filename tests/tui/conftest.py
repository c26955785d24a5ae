"""Fixtures of the TUI tests."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def model(tiny_model_factory) -> str:
    """Byte-level tokens: the shipped prompts need a context longer than the default 1024."""
    return tiny_model_factory("llama", max_position_embeddings=8192)
