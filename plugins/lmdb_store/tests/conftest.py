"""Fixtures of the kvcore-lmdb tests: a clean KVCORE_* environment, helpers on sys.path."""

from __future__ import annotations

import os
import sys

import pytest

from kvcore.testing.figures import figure, pytest_terminal_summary  # noqa: F401  (issue 17 figures)

sys.path.insert(0, os.path.dirname(__file__))  # for `import lmdb_workers` (importlib mode)


@pytest.fixture(autouse=True)
def _clean_kvcore_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("KVCORE_"):
            monkeypatch.delenv(name)
