"""In-process counters and latency histograms of one kvcore instance.

Plain Python, no dependency: :meth:`Metrics.snapshot` gives a dict (``kvcore`` CLI, control API);
:func:`kvcore.control.prometheus.render_stats` renders it in the Prometheus text format.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

CATALOGUE: dict[str, str] = {
    # lookups and stores (the engine)
    "lookups_total": "Prefix lookups.",
    "hit_tokens_total": "Prompt tokens found cached by lookups.",
    "miss_tokens_total": "Prompt tokens not cached at lookup (full chunks only).",
    "lookup_seconds": "Latency of one lookup.",
    "request_misses_total": "Requests whose first missing chunk missed for a reason, by reason "
                            "(never_stored, evicted, other_namespace, load_failed, ...; "
                            "docs/misses.md).",
    "stored_chunks_total": "Chunks stored into the memory tier.",
    "store_rejected_chunks_total": "Chunks the memory tier refused (full of held or pinned "
                                   "chunks, larger than its budget, admission).",
    "stores_dropped_total": "Stores dropped because the store queue was full.",
    "store_errors_total": "Stores that failed.",
    "store_seconds": "Latency of one store into the memory tier.",
    "write_behind_dropped_total": "Chunks not copied to a lower tier (write-behind queue full).",
    "bytes_stored_total": "Chunk bytes a tier accepted, by tier.",
    "bytes_loaded_total": "Chunk bytes loaded, by tier.",
    "bytes_written_total": "Bytes a lower tier accepted as stored (framed, after its codec), "
                           "by tier.",
    "codec_encode_seconds": "Time to encode one chunk for a lower tier, by codec.",
    "codec_decode_seconds": "Time to decode one chunk read from a lower tier, by codec.",
    "promoted_chunks_total": "Chunks read from a lower tier into memory, by source tier.",
    "chunks_admitted_total": "Chunks a tier admitted, by tier (reported by tiers).",
    "evictions_total": "Chunks evicted (or deleted), by tier.",
    "corrupt_chunks_total": "Chunks that failed verification (a miss, deleted), by tier.",
    "tier_errors_total": "Failed or timed-out tier operations, by tier.",
    "tier_contains_seconds": "Latency of one lookup in a lower tier.",
    "tier_get_seconds": "Latency of one load from a lower tier.",
    "tier_put_seconds": "Latency of one store into a lower tier.",
    "tier_delete_seconds": "Latency of one delete in a lower tier.",
    "tier_pin_seconds": "Latency of one pin in a lower tier.",
    "tier_unpin_seconds": "Latency of one unpin in a lower tier.",
    "tier_usage_seconds": "Latency of one usage report of a lower tier.",
    # tier usage (gauges rendered from stats())
    "tier_used_bytes": "Bytes held by a tier.",
    "tier_budget_bytes": "Byte budget of a tier.",
    "tier_chunks": "Chunks held by a tier.",
    "tier_usage_ratio": "Used bytes over budget of a tier.",
    # the vLLM connector
    "vllm_connector_seconds": "Time in one connector call, by call.",
    "vllm_loaded_tokens_total": "Tokens loaded into vLLM's blocks.",
    "vllm_load_error_blocks_total": "Blocks whose load failed (recomputed by vLLM).",
    "vllm_async_loads_total": "Asynchronous loads started.",
    "vllm_store_requests_total": "Requests whose chunks were submitted for storing.",
    "vllm_store_cancelled_total": "Stores cancelled (request preempted or finished early).",
    "vllm_store_timeouts_total": "Stores not finished within KVCORE_VLLM_STORE_TIMEOUT_S.",
    "vllm_stores_dropped_total": "Stores dropped because their blocks or context failed to "
                                 "load in the same step.",
    "vllm_stores_rewound_total": "Requests whose stored-chunk count was rewound after a "
                                 "failed load.",
    "vllm_preempted_requests_total": "Requests preempted while kvcore tracked them.",
    "vllm_worker_errors_total": "Worker-side failures (the blocks are recomputed), by kind.",
    "vllm_scheduler_errors_total": "Scheduler-side failures (treated as a miss), by kind.",
    # sampled verification (kvcore_vllm.verify)
    "verify_sampled_total": "Requests recomputed to verify kvcore's copy.",
    "verify_chunks_total": "Chunks compared with vLLM's recompute.",
    "verify_exact_total": "Compared chunks bit-identical to the recompute.",
    "verify_within_tolerance_total": "Compared chunks within KVCORE_VERIFY_TOLERANCE.",
    "verify_mismatch_total": "Compared chunks beyond the tolerance (deleted and replaced).",
    "verify_skipped_total": "Verifications skipped (too many waiting).",
    "verify_errors_total": "Verifications that failed.",
    "verify_difference": "Largest relative difference of a chunk accepted within tolerance.",
    # KV events (kvcore.events)
    "kv_events_published_total": "KV events published (BlockStored, BlockRemoved).",
    "kv_events_dropped_total": "Tier notifications dropped before publishing (queue full).",
    "kv_events_errors_total": "Failures of the KV event publisher thread.",
    "kv_events_bad_replays_total": "Malformed replay requests ignored.",
    # the cache server (kvcore.server)
    "server_requests_total": "Requests served, by kind (hello, reserve, acquire...).",
    "server_bad_requests_total": "Requests refused as malformed or out of bounds.",
    "server_leases_ended_total": "Client leases ended (expired, or ended by the client).",
    "server_arena_full_total": "Reservations refused for lack of a free extent in the arena.",
    "server_busy_total": "Lower-tier requests refused because too many were queued.",
    # the controller
    "controller_instances": "Instances registered with the controller.",
    "controller_chunks_indexed": "Chunks the controller's index holds, by instance and tier.",
    "controller_commands_total": "Commands sent to instances, by operation.",
    "controller_command_failures_total": "Commands that failed or timed out, by operation.",
    "controller_events_total": "Chunk keys admitted or evicted as reported by instances.",
    "controller_auth_failures_total": "Requests refused for a missing or wrong token.",
    "controller_instances_expired_total": "Instances dropped after missing heartbeats.",
    "controller_registrations_total": "Instance registrations (first and again).",
    "controller_lookups_total": "Lookup requests.",
    "controller_routes_total": "Route requests.",
}
"""Every metric kvcore records, with its help text (the Prometheus ``# HELP`` line). A test
checks that each name recorded in the code is listed here."""

LABEL_NAMES: dict[str, str] = {"request_misses_total": "reason", "server_requests_total": "kind",
                               "server_leases_ended_total": "why"}
"""The Prometheus label of a metric's label where it is not ``tier``."""

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
