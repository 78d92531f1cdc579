"""kvcore's pytest plugin: the fixtures every kvcore test root shares, for plugin authors too.

Installed with kvcore (entry point ``pytest11``), so any test suite can use:

- ``kvcore_env``: removes every ``KVCORE_*`` variable for the test, so it starts from the
  built-in defaults whatever the shell exports. Set ``kvcore_isolate_env = true`` in the pytest
  ini options to apply it to every test (kvcore's own pyproject.toml does);
- ``make_engine``: ``make_engine(**settings)`` builds a :class:`~kvcore.engine.CacheEngine` from
  ``load_settings(**settings)``, closed at teardown;
- ``free_port``: a function returning a loopback TCP port that was free a moment ago;
- ``figure``: ``figure("...")`` records a measured line (leases an unauthenticated client took,
  memory under an attack, chunks lost); the lines are printed in a "kvcore figures" section at
  the end of the run, also where output is otherwise captured (CI).

Nothing here imports more than pytest at start-up; the engine is imported on first use.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from kvcore.testing.ports import free_port as _free_port

if TYPE_CHECKING:
    from kvcore.engine import CacheEngine

FIGURES: list[str] = []
ISOLATE_OPTION = "kvcore_isolate_env"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(ISOLATE_OPTION, type="bool", default=False,
                  help="kvcore: remove every KVCORE_* variable for every test")


@pytest.fixture
def kvcore_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No ``KVCORE_*`` variable for this test; returns ``monkeypatch`` to set some."""
    for name in list(os.environ):
        if name.startswith("KVCORE_"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture(autouse=True)
def _kvcore_isolated_env(request: pytest.FixtureRequest) -> None:
    if request.config.getini(ISOLATE_OPTION):
        request.getfixturevalue("kvcore_env")


@pytest.fixture
def make_engine() -> Iterator[Callable[..., CacheEngine]]:
    """``make_engine(**settings)``: a CacheEngine on those settings, closed at teardown."""
    from kvcore.config import load_settings
    from kvcore.engine import CacheEngine

    made: list[CacheEngine] = []

    def make(**settings: Any) -> CacheEngine:
        engine = CacheEngine(load_settings(**settings))
        made.append(engine)
        return engine

    yield make
    for engine in reversed(made):
        engine.close()


@pytest.fixture
def free_port() -> Callable[[], int]:
    """``free_port()``: a loopback TCP port that was free a moment ago."""
    return _free_port


@pytest.fixture
def figure(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """``figure("...")``: record one measured line under the test's name."""

    def report(line: str) -> None:
        FIGURES.append(f"{request.node.name}: {line.strip()}")
        print(line)

    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("kvcore figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
