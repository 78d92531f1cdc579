"""In-process counters and latency histograms of one kvcore instance.

Plain Python, no dependency: :meth:`Metrics.snapshot` gives a dict (``kvcore`` CLI, control API);
:func:`kvcore.control.prometheus.render_stats` renders it in the Prometheus text format.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    """Cumulative-bucket histogram as Prometheus defines it."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += value
        self.count += 1

    def as_dict(self) -> dict[str, Any]:
        cumulative, running = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            running += n
            cumulative.append([bound, running])
        return {"buckets": cumulative, "sum": self.total, "count": self.count}


class Metrics:
    """Thread-safe counters keyed by (name, label) and histograms keyed by name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, str], float] = defaultdict(float)
        self._histograms: dict[tuple[str, str], Histogram] = {}

    def inc(self, name: str, value: float = 1, label: str = "") -> None:
        with self._lock:
            self._counters[(name, label)] += value

    def observe(self, name: str, seconds: float, label: str = "") -> None:
        with self._lock:
            hist = self._histograms.get((name, label))
            if hist is None:
                hist = self._histograms[(name, label)] = Histogram()
            hist.observe(seconds)

    def get(self, name: str, label: str = "") -> float:
        with self._lock:
            return self._counters.get((name, label), 0.0)

    def snapshot(self) -> dict[str, Any]:
        """``{"counters": {name: {label: value}}, "histograms": {name: {label: {...}}}}``."""
        with self._lock:
            counters: dict[str, dict[str, float]] = defaultdict(dict)
            for (name, label), value in self._counters.items():
                counters[name][label] = value
            histograms: dict[str, dict[str, Any]] = defaultdict(dict)
            for (name, label), hist in self._histograms.items():
                histograms[name][label] = hist.as_dict()
        return {"counters": dict(counters), "histograms": dict(histograms)}
