"""Figures of the fault and fuzz suite (issue 17), shown at the end of every pytest run.

A test takes the ``figure`` fixture and reports a measured line (leases an unauthenticated
client took, memory under an attack, 5xx count under fuzz, chunks lost, ...); the lines are
printed in a "fault and fuzz figures" section of the terminal summary, also in CI, where output
is otherwise captured. A test root's conftest imports both names::

    from kvcore.testing.figures import figure, pytest_terminal_summary  # noqa: F401
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

FIGURES: list[str] = []


@pytest.fixture
def figure(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """``figure("...")``: record one measured line under the test's name."""

    def report(line: str) -> None:
        FIGURES.append(f"{request.node.name}: {line.strip()}")
        print(line)

    return report


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    if FIGURES:
        terminalreporter.section("fault and fuzz figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
