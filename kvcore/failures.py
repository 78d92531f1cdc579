"""Never raise into the engine: count every failure, log the first of each kind once.

kvcore sits on an inference engine's hot path, where an exception would end a request or the
engine. Every boundary (the engine's lower-tier calls, the vLLM and SGLang connectors, the
storage tiers) turns failures into a miss or a dropped store through one :class:`FailureLog`:
the failure is counted (a metric labelled by what failed) and its first occurrence of each kind
is logged with what happens instead; later ones only count.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class _Counter(Protocol):
    def inc(self, name: str, value: float = 1.0, label: str = "") -> None: ...


class FailureLog:
    """Counts failures in ``counter`` (of ``metrics``, when given) and logs each kind once.

    ``outcome`` says what happens instead ("treated as a miss", "the blocks are recomputed");
    ``prefix`` starts every line ("kvcore tier lmdb: ").
    """

    def __init__(self, logger: logging.Logger, outcome: str, *, prefix: str = "kvcore: ",
                 metrics: _Counter | None = None, counter: str = "errors_total",
                 label: str | None = None) -> None:
        self.logger = logger
        self.outcome = outcome
        self.prefix = prefix
        self.metrics = metrics
        self.counter = counter
        self.label = label
        """Metric label for every failure (a tier's name); None labels each by ``what``."""
        self.count = 0
        self._logged: set[str] = set()
        self._lock = threading.Lock()

    def record(self, what: str, error: BaseException | str) -> None:
        """``what`` failed with ``error`` (an exception or a reason): count it; log the first
        of its kind (``what`` and the exception type, or the start of the reason)."""
        if isinstance(error, BaseException):
            why, kind = f"{type(error).__name__}: {error}", type(error).__name__
        else:
            why, kind = error, error[:60]
        with self._lock:
            self.count += 1
            first = f"{what}:{kind}" not in self._logged
            self._logged.add(f"{what}:{kind}")
        if self.metrics is not None:
            self.metrics.inc(self.counter, label=self.label if self.label is not None else what)
        if first:
            self.logger.warning("%s%s failed (%s); %s", self.prefix, what, why, self.outcome)

    def guard(self, what: str, default: T, fn: Callable[[], T]) -> T:
        """``fn()``, or ``default`` (recorded) when it raises."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - the point: never raise into the engine
            self.record(what, exc)
            return default


def guarded(what: str, default: Any = None,
            failures: str = "failures") -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Method decorator: an exception from the method is recorded in ``self.<failures>`` (a
    :class:`FailureLog`) and ``default`` is returned instead (called first if callable)."""

    def wrap(method: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(method)
        def inner(self: Any, *args: Any, **kwargs: Any) -> T:
            try:
                return method(self, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - the point: never raise into the engine
                log: FailureLog | None = getattr(self, failures, None)
                if log is None:
                    raise
                log.record(what, exc)
                return default() if callable(default) else default

        return inner

    return wrap
