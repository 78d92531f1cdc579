"""Prometheus text format (version 0.0.4) from ``CacheEngine.stats()`` and metrics snapshots.

No dependency: the format is a few lines per sample. Every counter ``name`` of
:class:`kvcore.metrics.Metrics` becomes ``kvcore_<name>`` (with ``_total``), its label a ``tier``
label; every histogram becomes a Prometheus histogram; tier usage becomes gauges.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from kvcore.metrics import CATALOGUE, LABEL_NAMES

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BAD = re.compile(r"[^a-zA-Z0-9_]")

HELP = CATALOGUE
"""Help texts: :data:`kvcore.metrics.CATALOGUE`."""


class Families:
    """Samples grouped by metric family, rendered with one HELP/TYPE header per family."""

    def __init__(self, prefix: str = "kvcore_") -> None:
        self.prefix = prefix
        self._families: dict[str, tuple[str, str, list[str]]] = {}

    def _family(self, name: str, kind: str) -> list[str]:
        full = self.prefix + _BAD.sub("_", name)
        if full not in self._families:
            self._families[full] = (kind, HELP.get(name, name.replace("_", " ") + "."), [])
        return self._families[full][2]

    def add(self, name: str, kind: str, value: float, labels: Mapping[str, str]) -> None:
        """One counter or gauge sample."""
        if kind == "counter" and not name.endswith("_total"):
            name += "_total"
        full = self.prefix + _BAD.sub("_", name)
        self._family(name, kind).append(f"{full}{_labels(labels)} {_number(value)}")

    def add_histogram(self, name: str, hist: Mapping[str, Any],
                      labels: Mapping[str, str]) -> None:
        """A histogram given as ``{"buckets": [[le, cumulative], ...], "sum", "count"}``
        (the ``+Inf`` bucket is ``count``, whether given or not)."""
        lines = self._family(name, "histogram")
        full = self.prefix + _BAD.sub("_", name)
        for bound, count in hist.get("buckets", []):
            if not math.isinf(float(bound)):
                le = _number(bound)
                lines.append(f"{full}_bucket{_labels({**labels, 'le': le})} {_number(count)}")
        inf = {**labels, "le": "+Inf"}
        lines.append(f"{full}_bucket{_labels(inf)} {_number(hist.get('count', 0))}")
        lines.append(f"{full}_sum{_labels(labels)} {_number(hist.get('sum', 0.0))}")
        lines.append(f"{full}_count{_labels(labels)} {_number(hist.get('count', 0))}")

    def add_stats(self, stats: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> None:
        """Everything in a ``CacheEngine.stats()`` dict."""
        base = dict(labels or {})
        for tier, usage in sorted(stats.get("tiers", {}).items()):
            if not isinstance(usage, Mapping) or "used_bytes" not in usage or usage.get("error"):
                continue
            tl = {**base, "tier": str(tier)}
            self.add("tier_used_bytes", "gauge", usage["used_bytes"], tl)
            self.add("tier_budget_bytes", "gauge", usage["budget_bytes"], tl)
            self.add("tier_chunks", "gauge", usage.get("chunks", 0), tl)
            budget = usage["budget_bytes"] or 0
            self.add("tier_usage_ratio", "gauge",
                     usage["used_bytes"] / budget if budget else 0.0, tl)
        for name, by_label in sorted(stats.get("counters", {}).items()):
            for label, value in sorted(by_label.items()):
                self.add(name, "counter", value, _with_label(base, name, label))
        for name, by_label in sorted(stats.get("histograms", {}).items()):
            for label, hist in sorted(by_label.items()):
                self.add_histogram(name, hist, _with_label(base, name, label))

    def render(self) -> str:
        out: list[str] = []
        for full, (kind, help_text, lines) in self._families.items():
            out.append(f"# HELP {full} {help_text}")
            out.append(f"# TYPE {full} {kind}")
            out.extend(lines)
        return "\n".join(out) + "\n"


def render_stats(stats: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> str:
    """Prometheus text of one instance's ``CacheEngine.stats()``."""
    families = Families()
    families.add_stats(stats, labels)
    return families.render()


def render_many(items: Iterable[tuple[Mapping[str, Any], Mapping[str, str]]],
                families: Families | None = None) -> str:
    """Prometheus text of several instances' stats, each with its own labels."""
    families = families or Families()
    for stats, labels in items:
        families.add_stats(stats, labels)
    return families.render()


def _with_label(base: Mapping[str, str], name: str, label: str) -> dict[str, str]:
    return {**base, LABEL_NAMES.get(name, "tier"): label} if label else dict(base)


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    parts = []
    for key, value in labels.items():
        text = str(value).replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")
        parts.append(f'{_BAD.sub("_", key)}="{text}"')
    return "{" + ",".join(parts) + "}"


def _number(value: Any) -> str:
    number = float(value)
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    if number.is_integer() and abs(number) < 2**53:
        return str(int(number))
    return repr(number)
