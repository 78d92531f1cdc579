"""Fixtures of the core tests (the shared ones come from kvcore's pytest plugin,
:mod:`kvcore.testing.pytest_plugin`: a clean KVCORE_* environment, make_engine, figure)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import settings

from kvcore.engine import CacheEngine

# Tests assert behaviour, never time: no per-example deadline (the machine is shared and noisy).
settings.register_profile("kvcore", deadline=None)
settings.load_profile("kvcore")


@pytest.fixture
def engine(make_engine: Callable[..., CacheEngine]) -> CacheEngine:
    """A small engine (4-token chunks, 1 MiB of CPU tier), closed at teardown."""
    return make_engine(chunk_size=4, cpu_size="1MiB")
