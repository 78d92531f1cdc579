"""kvcore's metrics on vLLM's own ``/metrics``, without a controller.

vLLM carries connector statistics from its workers to the process that serves ``/metrics``:
each step the worker's :meth:`get_kv_connector_stats` result rides the model runner's output,
the scheduler aggregates the ranks' (:meth:`KVCoreStats.aggregate`), and vLLM's Prometheus stat
logger hands the plain dict to :class:`KVCorePromMetrics`, which the connector class builds there
(``build_prom_metrics``). So:

- :class:`StatsDelta` turns an engine's cumulative counters into the increase since its last
  report (at most every ``KVCORE_VLLM_STATS_INTERVAL_S``), plus the memory tier's usage gauges;
- :class:`KVCorePromMetrics` adds them to Prometheus counters named as the controller names them
  (``kvcore_hit_tokens_total``, ``kvcore_tier_used_bytes{tier}``...), labelled with vLLM's own
  labels (``model_name``, ``engine``) and kvcore's (``tier``, or ``reason``).

vLLM makes these statistics only when it logs stats (the OpenAI server does by default; offline
``LLM`` needs ``disable_log_stats=False``). The data crosses processes, so it is checked before
use: names must be metric names, values finite numbers, at most :data:`MAX_FAMILIES` families.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

from kvcore.engine import CacheEngine
from kvcore.metrics import CATALOGUE, LABEL_NAMES

log = logging.getLogger("vllm.kvcore")

MAX_FAMILIES = 256
"""Metric families one process creates from reported names (the catalogue has about 60)."""
MAX_LABELS = 64
"""Label values per family taken from one report."""
TIER_GAUGES = ("used_bytes", "budget_bytes", "chunks")
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,99}$")
_LABEL = re.compile(r"^[A-Za-z0-9_.:@-]{0,128}$")


def _empty() -> dict[str, Any]:
    return {"counters": {}, "gauges": {}}


@dataclass
class KVCoreStats(KVConnectorStats):
    """``data = {"counters": {name: {label: increase}}, "gauges": {name: {tier: value}}}``;
    ranks' stats add up."""

    data: dict[str, Any] = field(default_factory=_empty)

    def reset(self) -> None:
        self.data = _empty()

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for kind in ("counters", "gauges"):
            mine = self.data.setdefault(kind, {})
            for name, by_label in _section(other.data, kind).items():
                into = mine.setdefault(name, {})
                for label, value in by_label.items():
                    into[label] = into.get(label, 0.0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        """Each counter's increase over the interval, summed over labels (vLLM's log line)."""
        return {name: sum(by_label.values())
                for name, by_label in sorted(_section(self.data, "counters").items())}

    def is_empty(self) -> bool:
        return not (_section(self.data, "counters") or _section(self.data, "gauges"))


def _section(data: Any, kind: str) -> dict[str, dict[str, float]]:
    """``data[kind]`` with only well-formed names, labels and finite values (it crossed a
    process boundary)."""
    section = data.get(kind) if isinstance(data, Mapping) else None
    if not isinstance(section, Mapping):
        return {}
    out: dict[str, dict[str, float]] = {}
    for name, by_label in list(section.items())[:MAX_FAMILIES]:
        if not (isinstance(name, str) and _NAME.match(name) and isinstance(by_label, Mapping)):
            continue
        values = {label: float(value) for label, value in list(by_label.items())[:MAX_LABELS]
                  if isinstance(label, str) and _LABEL.match(label)
                  and isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value)}
        if values:
            out[name] = values
    return out


class StatsDelta:
    """An engine's counters as increases since the last report, and its tier usage."""

    def __init__(self, engine: CacheEngine, interval_s: float) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self._last: dict[str, dict[str, float]] = {}
        self._reported_at = -math.inf

    def take(self) -> KVCoreStats | None:
        """The stats to report now, or ``None`` (nothing new, or reported too recently)."""
        now = time.monotonic()
        if now - self._reported_at < self.interval_s or self.engine.closed:
            return None
        self._reported_at = now
        counters = self.engine.metrics.snapshot()["counters"]
        increases: dict[str, dict[str, float]] = {}
        for name, by_label in counters.items():
            last = self._last.get(name, {})
            grown = {label: value - last.get(label, 0.0) for label, value in by_label.items()
                     if value > last.get(label, 0.0)}
            if grown:
                increases[name] = grown
        self._last = {name: dict(by_label) for name, by_label in counters.items()}
        # The memory tier only: a lower tier's usage may be a network call, and this runs in
        # the worker's step (the controller reports every tier).
        memory = self.engine.memory
        usage = memory.usage()
        gauges = {f"tier_{gauge}": {memory.name: float(getattr(usage, gauge))}
                  for gauge in TIER_GAUGES}
        return KVCoreStats(data={"counters": increases, "gauges": gauges})


_families: dict[tuple[type, str, tuple[str, ...]], Any] = {}
"""Prometheus families made in this process, by (class, name, label names): a second engine
in the same process (another ``LLM``) reuses them instead of registering a duplicate."""


def _family(cls: type, name: str, documentation: str, labelnames: list[str]) -> Any:
    key = (cls, name, tuple(labelnames))
    family = _families.get(key)
    if family is None:
        if len(_families) >= MAX_FAMILIES:
            return None
        family = _families[key] = cls(name=name, documentation=documentation,
                                      labelnames=labelnames)
    return family


class KVCorePromMetrics(KVConnectorPromMetrics):
    """Adds the workers' reported increases to Prometheus counters, sets the tier gauges."""

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        try:
            self._observe(transfer_stats_data, engine_idx)
        except Exception as exc:  # metrics must never take the engine's frontend down
            log.warning("kvcore: could not record metrics in vLLM's registry: %s: %s",
                        type(exc).__name__, exc)

    def _observe(self, data: dict[str, Any], engine_idx: int) -> None:
        labelvalues = [str(v) for v in self.per_engine_labelvalues.get(engine_idx, [])]
        for name, by_label in _section(data, "counters").items():
            base = name.removesuffix("_total")
            label_name = LABEL_NAMES.get(f"{base}_total", LABEL_NAMES.get(name, "tier"))
            counter = _family(self._counter_cls, f"kvcore_{base}",
                              CATALOGUE.get(f"{base}_total", base.replace("_", " ") + "."),
                              [*self._labelnames, label_name])
            for label, value in by_label.items():
                if counter is not None and value > 0:
                    counter.labels(*labelvalues, label).inc(value)
        for name, by_tier in _section(data, "gauges").items():
            gauge = _family(self._gauge_cls, f"kvcore_{name}",
                            CATALOGUE.get(name, name.replace("_", " ") + "."),
                            [*self._labelnames, "tier"])
            for tier, value in by_tier.items():
                if gauge is not None:
                    gauge.labels(*labelvalues, tier).set(value)
