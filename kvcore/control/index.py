"""The controller's global index: which instance and tier holds which chunk.

Plain data, no I/O: the server calls it from its event loop (one thread), so it needs no lock.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvcore.keys import NAMESPACE_BYTES, ChunkKey, chunk_keys, key_namespace
from kvcore.namespaces import NamespaceEntry


@dataclass(frozen=True)
class ServedModel:
    """A prefix's target by name: whatever namespace each instance serves ``name`` under."""

    name: str
    rank: int = 0

    def matches(self, entry: NamespaceEntry) -> bool:
        """Whether ``entry`` is token-keyed, of this rank, and answers to the name."""
        return (entry.keyed_by == "tokens" and entry.namespace.rank == self.rank
                and answers_to(entry, self.name))


def answers_to(entry: NamespaceEntry, name: str) -> bool:
    """Whether ``entry`` answers to ``name``: a served name, the model, or the model without
    its ``@revision``."""
    model = entry.namespace.model
    return name in entry.served_as or name in (model, model.rpartition("@")[0])


@dataclass
class InstanceState:
    """One registered instance and what it holds, tier by tier."""

    id: str
    name: str
    chunk_size: int
    tiers: list[str]
    pid: int = 0
    host: str = ""
    registered_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    held: dict[str, set[ChunkKey]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    namespaces: dict[bytes, NamespaceEntry] = field(default_factory=dict)
    """The namespaces the instance reported, by digest."""
    role: str = "engine"
    cache_server: str = ""
    """The cache server whose tiers this engine reads (its holdings count as the engine's)."""

    def namespaces_for(self, target: bytes | ServedModel, tenant: str) -> list[bytes]:
        """The digests ``target`` means on this instance (``tenant``'s, for a served model)."""
        if isinstance(target, bytes):
            return [target]
        return list(dict.fromkeys(e.namespace.with_tenant(tenant).digest
                                  for e in self.namespaces.values() if target.matches(e)))

    def chunks_by_namespace(self) -> dict[bytes, dict[str, int]]:
        """Indexed chunks per namespace digest, per tier."""
        out: dict[bytes, dict[str, int]] = {}
        for tier, held in self.held.items():
            for key in held:
                by_tier = out.setdefault(key[:NAMESPACE_BYTES], {})
                by_tier[tier] = by_tier.get(tier, 0) + 1
        return out

    def tier_keys(self, tier: str) -> set[ChunkKey]:
        return self.held.setdefault(tier, set())

    def leading(self, keys: Sequence[ChunkKey]) -> tuple[int, dict[str, int]]:
        """Leading chunks held in any tier, and in each tier by itself."""
        by_tier = {}
        for tier in dict.fromkeys([*self.tiers, *self.held]):
            held = self.held.get(tier, set())
            n = 0
            while n < len(keys) and keys[n] in held:
                n += 1
            by_tier[tier] = n
        any_n = 0
        while any_n < len(keys) and any(keys[any_n] in h for h in self.held.values()):
            any_n += 1
        return any_n, by_tier


class GlobalIndex:
    """Instances by id, with their chunk sets; expiry by last-seen time."""

    def __init__(self) -> None:
        self.instances: dict[str, InstanceState] = {}

    def register(self, state: InstanceState, reset: bool) -> InstanceState:
        old = self.instances.get(state.id)
        if old is not None and not reset:
            state.held = old.held
            state.registered_at = old.registered_at
        if old is not None:
            state.namespaces = old.namespaces
        self.instances[state.id] = state
        return state

    def holder(self, state: InstanceState) -> InstanceState:
        """Whose tiers count for ``state``: its cache server's when it has one registered."""
        server = self.instances.get(state.cache_server) if state.cache_server else None
        return server if server is not None and server.role == "cache-server" else state

    def attached(self, server: InstanceState) -> list[str]:
        """The ids of the engines registered behind ``server``."""
        return [s.id for s in self.instances.values() if s.cache_server == server.id]

    def remove(self, instance_id: str) -> bool:
        return self.instances.pop(instance_id, None) is not None

    def seen(self, instance_id: str) -> InstanceState | None:
        state = self.instances.get(instance_id)
        if state is not None:
            state.last_seen = time.monotonic()
        return state

    def apply(self, instance_id: str, tier: str, kind: str, keys: list[ChunkKey]) -> None:
        state = self.instances[instance_id]
        held = state.tier_keys(tier)
        if kind == "admit":
            held.update(keys)
        else:
            held.difference_update(keys)

    def forget(self, instance_id: str, namespace: bytes | None, tier: str | None) -> None:
        """Drop index entries after a clear (the instance's own events may lag)."""
        state = self.instances.get(instance_id)
        if state is None:
            return
        for name, held in state.held.items():
            if tier is not None and name != tier:
                continue
            if namespace is None:
                held.clear()
            else:
                held.difference_update([k for k in held if key_namespace(k) == namespace])

    def expire(self, expiry_s: float) -> list[str]:
        """Remove instances not seen for ``expiry_s``; return their ids."""
        now = time.monotonic()
        gone = [i for i, s in self.instances.items() if now - s.last_seen > expiry_s]
        for instance_id in gone:
            del self.instances[instance_id]
        return gone

    def lookup(self, target: bytes | ServedModel, tokens: Sequence[int], tenant: str = ""
               ) -> list[tuple[InstanceState, bytes, int, dict[str, int]]]:
        """For every instance that ``target`` means something on: the namespace counted, the
        leading tokens cached in any tier, and per tier.

        A namespace digest means the same on every instance; a served model name means the
        namespaces each instance declared for it (the one holding most, where several match).
        An engine behind a cache server holds what the server holds; the server itself serves
        no requests and is not listed.
        """
        keys_by: dict[tuple[bytes, int], list[ChunkKey]] = {}
        out = []
        for state in self.instances.values():
            if state.role == "cache-server":
                continue
            holder = self.holder(state)
            size = holder.chunk_size
            best: tuple[bytes, int, dict[str, int]] | None = None
            for digest in state.namespaces_for(target, tenant):
                keys = keys_by.get((digest, size))
                if keys is None:
                    keys = keys_by[digest, size] = chunk_keys(digest, tokens, size,
                                                              tenant=tenant)
                chunks, by_tier = holder.leading(keys)
                if best is None or chunks * size > best[1]:
                    best = (digest, chunks * size, {t: n * size for t, n in by_tier.items()})
            if best is not None:
                out.append((state, *best))
        return out

    def route(self, target: bytes | ServedModel, tokens: Sequence[int], tenant: str = ""
              ) -> tuple[InstanceState, bytes, int] | None:
        """The instance with the longest cached prefix.

        Ties go to the one holding more of it in its fastest tier, then to the one holding
        fewer chunks in all (a proxy for load), then by id.
        """
        best = None
        for state, digest, n, by_tier in self.lookup(target, tokens, tenant):
            holder = self.holder(state)
            fast = by_tier.get(holder.tiers[0], 0) if holder.tiers else 0
            load = sum(len(h) for h in holder.held.values())
            rank = (-n, -fast, load, state.id)
            if best is None or rank < best[0]:
                best = (rank, state, digest, n)
        return None if best is None else (best[1], best[2], best[3])
