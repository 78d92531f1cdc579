"""The Python examples of the docs run as they are written."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
RUNNABLE = ["python-api.md"]
"""Pages whose every ```python block is a complete, runnable program."""


def _blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.S)


@pytest.mark.parametrize("page", RUNNABLE)
def test_python_examples_run(page: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("KVCORE_")]:
        monkeypatch.delenv(name)
    blocks = _blocks(page)
    assert blocks, f"{page} has no python example"
    for i, block in enumerate(blocks):
        exec(compile(block, f"{page}[{i}]", "exec"), {"__name__": f"docs_example_{i}"})
