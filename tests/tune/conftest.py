"""The sweep and ablation tests train on the session's training cache."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tune_cache(train_cache) -> str:
    """The training cache of tests/conftest.py (200 synthetic 64-px images, tiny teacher, 2x2 LAR grid)."""
    return train_cache
