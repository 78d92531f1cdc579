"""The one way kvcore turns failures into misses: counted, logged once per kind, never raised."""

from __future__ import annotations

import logging

import pytest

from kvcore.failures import FailureLog, guarded
from kvcore.metrics import Metrics


def test_each_kind_is_logged_once_and_every_failure_counted(caplog) -> None:
    metrics = Metrics()
    failures = FailureLog(logging.getLogger("kvcore.test"), "treated as a miss",
                          prefix="kvcore tier t: ", metrics=metrics, counter="tier_errors_total",
                          label="t")
    with caplog.at_level(logging.WARNING, logger="kvcore.test"):
        for _ in range(3):
            failures.record("get", TimeoutError("slow"))
        failures.record("get", ValueError("bad"))
        failures.record("put", "no answer within 5.0s")
        failures.record("put", "no answer within 5.0s")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["kvcore tier t: get failed (TimeoutError: slow); treated as a miss",
                     "kvcore tier t: get failed (ValueError: bad); treated as a miss",
                     "kvcore tier t: put failed (no answer within 5.0s); treated as a miss"]
    assert failures.count == 6
    assert metrics.snapshot()["counters"]["tier_errors_total"] == {"t": 6}


def test_guard_and_guarded_return_the_default_instead_of_raising() -> None:
    class Side:
        def __init__(self) -> None:
            self.failures = FailureLog(logging.getLogger("kvcore.test"), "recomputed")

        @guarded("load", default=list)
        def load(self, fail: bool) -> list[int]:
            if fail:
                raise RuntimeError("boom")
            return [1]

    side = Side()
    assert side.load(False) == [1]
    assert side.load(True) == []
    assert side.failures.guard("lookup", 0, lambda: 1 // 0) == 0
    assert side.failures.count == 2


def test_guarded_without_a_failure_log_raises() -> None:
    class Bare:
        @guarded("load")
        def load(self) -> None:
            raise RuntimeError("no log to record it in")

    with pytest.raises(RuntimeError):
        Bare().load()
