"""Shared fixtures of the core tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import settings

from kvcore.config import load_settings
from kvcore.engine import CacheEngine
from kvcore.testing.figures import figure, pytest_terminal_summary  # noqa: F401  (issue 17 figures)

# Tests assert behaviour, never time: no per-example deadline (the machine is shared and noisy).
settings.register_profile("kvcore", deadline=None)
settings.load_profile("kvcore")


@pytest.fixture(autouse=True)
def _clean_kvcore_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start from the built-in defaults, whatever the developer's shell exports."""
    for name in list(os.environ):
        if name.startswith("KVCORE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def engine() -> Iterator[CacheEngine]:
    eng = CacheEngine(load_settings(chunk_size=4, cpu_size="1MiB"))
    yield eng
    eng.close()
