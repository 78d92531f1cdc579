"""Why a request missed: what happened to each chunk, and a bounded log of requests.

- :class:`ChunkHistory` keeps the latest fate of each chunk in each tier (stored, evicted,
  deleted, failed verification, not admitted) for the chunks this instance handled last;
- :func:`explain` turns the first chunk a lookup did not find into a :class:`Miss`: a reason
  from :data:`REASONS` and the facts behind it (which tier, when, by which policy; which
  namespace field differs);
- :class:`RequestLog` keeps the last requests' :class:`RequestRecord` (tokens asked, tokens hit
  by tier, the miss, how the load went), served by the controller at ``/v1/requests``;
- :class:`MissRecorder` makes those records for an engine, counts misses by reason and logs
  them at DEBUG.

Everything is bounded by a count of entries (``KVCORE_CHUNK_HISTORY_SIZE``,
``KVCORE_REQUEST_LOG_SIZE``); the oldest are forgotten first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from kvcore.keys import NAMESPACE_BYTES, ChunkKey, Namespace, chunk_keys
from kvcore.metrics import Metrics
from kvcore.namespaces import NamespaceBook
from kvcore.planner import Plan

log = logging.getLogger("kvcore.engine")

REASONS: dict[str, str] = {
    "never_stored": "No tier of this instance ever held the chunk (as far as it remembers).",
    "evicted": "A tier held the chunk and evicted it (or lost it without saying: `policy` "
               "is then empty).",
    "deleted": "Removed by a delete or clear (an operator, the control API).",
    "corrupt": "Failed verification when read, and was removed.",
    "not_admitted": "Evicted from memory and never written below it: the lower-tier "
                    "admission (KVCORE_LOWER_ADMISSION) had not admitted it.",
    "other_namespace": "Held under another namespace: `differs` names the fields "
                       "(model, layout, rank, tenant, ...).",
    "planner_skipped": "Found below memory, but the planner expected recomputing it to be "
                       "faster than loading it (`load_s`, `recompute_s`).",
    "load_failed": "Found at lookup, but the load did not deliver it.",
    "load_late": "Found at lookup, but the load did not finish within its timeout.",
    "partial_chunk": "The prompt is shorter than one chunk: nothing to look up.",
}
"""Every miss reason, with what it means (docs/misses.md repeats them)."""

EVENTS = ("stored", "evicted", "deleted", "corrupt", "not_admitted")


@dataclass(frozen=True)
class Fate:
    """The latest thing that happened to a chunk in one tier."""

    tier: str
    event: str
    """One of :data:`EVENTS`."""
    at: float
    """Unix time."""
    policy: str = ""
    """The eviction policy of an ``evicted`` event, the admission of a ``not_admitted`` one."""


class ChunkHistory:
    """The latest :class:`Fate` per tier of the last ``limit`` chunks noted. Thread-safe."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._fates: OrderedDict[bytes, dict[str, Fate]] = OrderedDict()
        self._lock = threading.Lock()

    def note(self, tier: str, event: str, keys: Sequence[ChunkKey], policy: str = "") -> None:
        if not keys or self.limit <= 0:
            return
        fate = Fate(tier, event, time.time(), policy)
        with self._lock:
            for key in keys:
                key = bytes(key)
                by_tier = self._fates.get(key)
                if by_tier is None:
                    by_tier = self._fates[key] = {}
                else:
                    self._fates.move_to_end(key)
                by_tier[tier] = fate
            while len(self._fates) > self.limit:
                self._fates.popitem(last=False)

    def fates(self, key: ChunkKey) -> list[Fate]:
        """What happened to ``key`` in each tier, oldest event first."""
        with self._lock:
            found = self._fates.get(bytes(key))
            return sorted(found.values(), key=lambda f: f.at) if found else []

    def __len__(self) -> int:
        return len(self._fates)


@dataclass
class Miss:
    """Why chunk ``chunk`` (the first one not found) of a request missed."""

    reason: str
    """One of :data:`REASONS`."""
    chunk: int
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "chunk": self.chunk, **self.detail}


_PRECEDENCE = ("corrupt", "deleted", "stored", "not_admitted", "evicted")
"""When tiers tell different stories, the first of these found is the reason. ``stored``: a
tier that held the chunk last and has it no more dropped it without saying (Redis evicting
under ``maxmemory``, another process sharing the tier)."""


def _from_fates(fates: list[Fate], chunk: int) -> Miss | None:
    """The reason a chunk with this history is absent; None when nothing is known of it."""
    if not fates:
        return None
    tiers = [{"tier": f.tier, "event": f.event, "at": round(f.at, 3),
              **({"policy": f.policy} if f.policy else {})} for f in fates]
    events = {f.event for f in fates}
    event = next(e for e in _PRECEDENCE if e in events)
    fate = next(f for f in reversed(fates) if f.event == event)
    if event == "stored":
        return Miss("evicted", chunk, {"tier": fate.tier, "at": None, "policy": "",
                                       "tiers": tiers})
    detail: dict[str, Any] = {"tier": fate.tier, "at": round(fate.at, 3)}
    if fate.policy:
        detail["policy"] = fate.policy
    return Miss(event, chunk, {**detail, "tiers": tiers})


def namespace_differences(ours: Namespace, theirs: Namespace) -> list[str]:
    """The fields in which two namespaces differ."""
    return [f.name for f in fields(Namespace) if getattr(ours, f.name) != getattr(theirs, f.name)]


MAX_OTHER_NAMESPACES = 16
"""Namespaces (the most recently seen) a miss is checked against."""


def explain(key: ChunkKey, chunk: int, history: ChunkHistory,
            namespaces: Sequence[Namespace], ours: Namespace | None,
            tokens: Sequence[int] | None, chunk_size: int,
            locate: Callable[[list[ChunkKey]], list[str | None]]) -> Miss:
    """Why ``key``, chunk ``chunk`` of a request, is in no tier.

    ``namespaces`` are the ones this instance has seen (most recent last); ``ours`` the
    request's, when known; ``tokens`` its prompt (needed to check another tenant, whose chain
    of hashes differs); ``locate`` finds keys in the tiers (:meth:`TierStack.locate`).
    """
    known = _from_fates(history.fates(key), chunk)
    if known is not None:
        return known
    candidates: list[tuple[Namespace, ChunkKey]] = []
    for other in list(namespaces)[-MAX_OTHER_NAMESPACES:]:
        if other.digest == key[:NAMESPACE_BYTES]:
            continue
        if ours is None or other.tenant == ours.tenant:
            candidates.append((other, other.digest + key[NAMESPACE_BYTES:]))
        elif tokens is not None and len(tokens) >= (chunk + 1) * chunk_size:
            theirs = chunk_keys(other, tokens[: (chunk + 1) * chunk_size], chunk_size)[-1]
            candidates.append((other, theirs))
    if candidates:
        found = locate([k for _, k in candidates])
        for (other, _), tier in zip(candidates, found):
            if tier is not None:
                detail: dict[str, Any] = {"tier": tier, "namespace": other.digest.hex()}
                if ours is not None:
                    differs = namespace_differences(ours, other)
                    detail["differs"] = {name: {"asked": getattr(ours, name),
                                                "held": getattr(other, name)}
                                         for name in differs}
                return Miss("other_namespace", chunk, detail)
    return Miss("never_stored", chunk)


@dataclass
class RequestRecord:
    """What kvcore saw of one request: asked, found by tier, and why the rest missed."""

    id: str
    at: float
    namespace: str
    """The namespace digest (hex)."""
    tokens_asked: int
    """Prompt tokens looked up (full chunks; ``tokens_prompt`` when the connector gave it)."""
    tokens_hit: int
    hit_by_tier: dict[str, int]
    """Tokens found, by the first tier that holds them."""
    sources: list[str]
    """The tier of each leading chunk found (kept to explain a load that fails)."""
    tokens_prompt: int | None = None
    miss: Miss | None = None
    load: dict[str, Any] | None = None
    """How the load went: chunks ``asked`` and ``loaded``, and a :class:`Miss` when short."""

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("sources")
        out["at"] = round(self.at, 3)
        out["miss"] = self.miss.as_dict() if self.miss is not None else None
        return out


class RequestLog:
    """The last ``limit`` :class:`RequestRecord` by request id. Thread-safe."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._records: OrderedDict[str, RequestRecord] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, record: RequestRecord) -> bool:
        """Keep ``record`` (replacing an earlier one of the same id); True when the id is new."""
        if self.limit <= 0:
            return False
        with self._lock:
            new = record.id not in self._records
            self._records[record.id] = record
            self._records.move_to_end(record.id)
            while len(self._records) > self.limit:
                self._records.popitem(last=False)
        return new

    def get(self, request_id: str) -> RequestRecord | None:
        with self._lock:
            return self._records.get(request_id)

    def recent(self, limit: int) -> list[RequestRecord]:
        """The newest ``limit`` records, newest first."""
        with self._lock:
            records = list(self._records.values())
        return records[::-1][: max(0, limit)]


class MissRecorder:
    """Makes the record of each request an engine looks up or loads with a request id: the
    reason for its first missing chunk (:func:`explain`), counted by reason and logged at
    DEBUG."""

    def __init__(self, history: ChunkHistory, requests: RequestLog, metrics: Metrics,
                 chunk_size: int, namespaces: NamespaceBook) -> None:
        self.history = history
        self.requests = requests
        self.metrics = metrics
        self.chunk_size = chunk_size
        self.namespaces = namespaces
        """The engine's known namespaces (a miss may find its chunks held under another one)."""

    def lookup(self, request_id: str, keys: list[ChunkKey], claimed: int,
               by_tier: dict[str, int], sources: list[str], tokens: Sequence[int] | None,
               plan: Plan, locate: Callable[[list[ChunkKey]], list[str | None]]) -> None:
        """Record a lookup that claimed the first ``claimed`` of ``keys``."""
        size = self.chunk_size
        miss: Miss | None = None
        if not keys:
            miss = Miss("partial_chunk", 0)
        elif plan.claim < plan.found:
            miss = Miss("planner_skipped", claimed, {
                "tier": plan.tier, "found_tokens": plan.found * size,
                "load_s": round(plan.load_s or 0.0, 6),
                "recompute_s": round(plan.recompute_s or 0.0, 6)})
        elif claimed < len(keys):
            namespaces = self.namespaces.namespaces()
            ours = self.namespaces.get(keys[claimed][:NAMESPACE_BYTES])
            miss = explain(keys[claimed], claimed, self.history, namespaces, ours, tokens, size,
                           locate)
        record = RequestRecord(
            id=request_id, at=time.time(),
            namespace=keys[0][:NAMESPACE_BYTES].hex() if keys else "",
            tokens_asked=len(keys) * size, tokens_hit=claimed * size,
            hit_by_tier={t: c * size for t, c in by_tier.items()}, sources=list(sources),
            tokens_prompt=len(tokens) if tokens is not None else None, miss=miss)
        if self.requests.put(record) and miss is not None:
            self.metrics.inc("request_misses_total", label=miss.reason)
        log.debug("kvcore request %s: asked %d tokens, hit %d %s, miss %s", request_id,
                  record.tokens_asked, record.tokens_hit, record.hit_by_tier,
                  miss.as_dict() if miss is not None else None)

    def load(self, request_id: str, keys: list[ChunkKey], loaded: int, first_chunk: int,
             late: bool) -> None:
        """Record how a load of chunks ``first_chunk...`` of a request went (and why it fell
        short)."""
        record = self.requests.get(request_id)
        if record is None:  # looked up in another process (vLLM's scheduler): load facts only
            record = RequestRecord(id=request_id, at=time.time(),
                                   namespace=keys[0][:NAMESPACE_BYTES].hex() if keys else "",
                                   tokens_asked=0, tokens_hit=0, hit_by_tier={}, sources=[])
            self.requests.put(record)
        load: dict[str, Any] = {"from_chunk": first_chunk, "chunks_asked": len(keys),
                                "chunks_loaded": loaded, "miss": None}
        if loaded < len(keys):
            chunk = first_chunk + loaded
            tier = record.sources[chunk] if chunk < len(record.sources) else None
            fates = [f for f in self.history.fates(keys[loaded]) if f.at >= record.at]
            gone = [f for f in fates if f.event in ("evicted", "deleted")]
            if late:
                cause = ("a read ran past its timeout (KVCORE_TIER_TIMEOUT_S, or the "
                         "connector's load timeout)")
            elif any(f.event == "corrupt" for f in fates):
                cause = "failed verification"
            elif gone:
                cause = f"{gone[-1].event} from {gone[-1].tier} after the lookup"
            else:
                cause = "not readable (tier error or timeout, see the tier's errors)"
            reason = "load_late" if late else "load_failed"
            load["miss"] = Miss(reason, chunk, {"tier": tier, "cause": cause}).as_dict()
            self.metrics.inc("request_misses_total", label=reason)
            log.debug("kvcore request %s: load short: %s", request_id, load["miss"])
        record.load = load
