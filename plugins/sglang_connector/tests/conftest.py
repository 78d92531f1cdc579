"""Fixtures of the kvcore-sglang tests; the shims and pool builders are in sglang_support.py."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

pytest.importorskip("torch")
pytest.importorskip("sglang.srt.mem_cache.hicache_storage",
                    reason="SGLang sources not installed (pip install --no-deps sglang==0.5.23)")

sys.path.insert(0, os.path.dirname(__file__))  # for `import sglang_support` (importlib mode)

from sglang_support import small_engine  # noqa: E402

from kvcore.engine import CacheEngine  # noqa: E402


@pytest.fixture
def engine() -> Iterator[CacheEngine]:
    eng = small_engine()
    yield eng
    eng.close()
