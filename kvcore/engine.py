"""The cache engine: the one API an engine connector uses, over the configured tiers.

The first tier is the memory tier (a :class:`~kvcore.interfaces.MemoryTier`; the in-process CPU
tier by default); every tier after it comes from a plugin and is used through the
:class:`~kvcore.interfaces.Tier` interface only, with no special cases. :class:`CacheEngine` is a
thin facade over two parts:

- :class:`~kvcore.tier_stack.TierStack` (synchronous): where each chunk is, promotion into
  memory, delete, pin, clear, usage; every lower-tier call bounded and verified;
- :class:`~kvcore.pipeline.Pipeline` (asynchronous): the store queue and its thread, one
  write-behind worker per lower tier, prefetches in flight, flush and close;
- :class:`~kvcore.attachments.Attachments`: what plugins run beside the engine (the controller
  reporter, a peer server), started after the tiers and closed before them.

- **lookup** counts the leading run of chunks held by any tier (no data moves) and starts a
  prefetch of those found only below memory, so the load that follows finds them there;
- **store** returns at once (the pipeline fills memory-tier buffers and writes them behind);
- **retrieve** / :meth:`CacheEngine.acquire` hand out the leading run of chunks, reading lower
  tiers (verified, promoted into memory) where memory misses;
- an error, a timeout or a corrupted value below memory is a miss, logged once per kind and
  counted, never an exception to the caller;
- a lookup or load given a ``request_id`` is recorded in :attr:`CacheEngine.requests`, with the
  reason the first missing chunk missed (:mod:`kvcore.misses`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import numpy as np

from kvcore import logs
from kvcore.attachments import Attachments
from kvcore.codecs.context import CodecContext
from kvcore.config import (
    ConfigError,
    Settings,
    load_settings,
    unknown_file_keys,
    unknown_variables,
)
from kvcore.interfaces import Buffer, MemoryTier, Tier, TierContext
from kvcore.keys import ChunkKey, Namespace, chunk_keys
from kvcore.metrics import Metrics
from kvcore.misses import ChunkHistory, MissRecorder, RequestLog
from kvcore.namespaces import KeyedBy, NamespaceBook
from kvcore.pending import PendingStores
from kvcore.pipeline import BufferSource, ChunkSource, Pipeline, StoreHandle
from kvcore.planner import Planner
from kvcore.plugins import ENTRY_POINT_GROUP, PluginRegistry, get_registry
from kvcore.tier_stack import LowerTier, TierStack

__all__ = ["BufferSource", "CacheEngine", "ChunkLease", "ChunkSource", "LookupResult",
           "StoreHandle", "open_engine"]

log = logging.getLogger("kvcore.engine")

@dataclass
class LookupResult:
    """Leading chunks found: in total and by the tier that answered first for each."""

    chunks: int
    """Leading chunks claimed: found, and not left to recompute by the planner."""
    chunk_size: int
    by_tier: dict[str, int] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    """For each of the leading ``chunks``, the name of the first tier that holds it."""
    found: int = 0
    """Leading chunks held by some tier (``chunks`` or more)."""

    @property
    def tokens(self) -> int:
        return self.chunks * self.chunk_size


class ChunkLease:
    """Views of the leading cached chunks, valid (never evicted) until :meth:`close`."""

    def __init__(self, memory: MemoryTier, keys: list[ChunkKey],
                 views: list[memoryview]) -> None:
        self._memory = memory
        self.keys = keys
        self.views = views
        self._open = True

    def __len__(self) -> int:
        return len(self.views)

    def arrays(self) -> list[np.ndarray]:
        """The views as read-only uint8 arrays."""
        return [np.frombuffer(v, dtype=np.uint8) for v in self.views]

    def close(self) -> None:
        if self._open:
            self._open = False
            self._memory.release(self.views)

    def __enter__(self) -> ChunkLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_warned_settings: set[str] = set()


@functools.cache
def _installed_plugin_names() -> tuple[str, ...]:
    """Entry-point names of every installed plugin (read once: a scan of the entry points)."""
    return tuple(ep.name.lower() for ep in metadata.entry_points(group=ENTRY_POINT_GROUP))


def _server_tier(settings: Settings, planner: Planner,
                 namespaces: NamespaceBook) -> MemoryTier | None:
    """The cache server's shared memory tier when ``KVCORE_SERVER_URL`` is set (docs/server.md),
    else None; the planner learns the server's tier costs from it, and the server the
    engine's namespaces."""
    from kvcore.server.settings import ServerSettings

    server = load_settings(ServerSettings)
    if not server.url:
        return None
    try:
        from kvcore.server.client import ServerTier
    except ImportError as exc:
        raise ConfigError(f"KVCORE_SERVER_URL needs pyzmq and msgspec ({exc.name} is missing): "
                          "pip install 'kvcore[events]'") from None
    tier = ServerTier(server, budget=int(settings.cpu_size), costs=planner.tier,
                      namespaces=namespaces)
    tier.name = "server"
    return tier


def _warn_unknown_settings(registry: PluginRegistry) -> None:
    """One warning per process for each ``KVCORE_*`` variable and config-file key nothing
    declares (a typo would silently keep the default; ``kvcore config`` rejects it). Those of
    installed plugins that ``KVCORE_PLUGINS`` leaves out (``KVCORE_<NAME>_*``, a ``<name>``
    table or ``<name>_*`` keys) are not warned about."""
    names = _installed_plugin_names()
    variables = tuple(f"KVCORE_{name.upper()}_" for name in names)
    keys = tuple(f"{name}{sep}" for name in names for sep in "._")
    classes = [Settings, *registry.settings.values()]
    found = [(v, c, "variable") for v, c in unknown_variables(classes)
             if not v.startswith(variables)]
    found += [(k, c, "config-file key") for k, c in unknown_file_keys(classes)
              if not k.startswith(keys) and k not in names]
    for name, closest, kind in found:
        if name not in _warned_settings:
            _warned_settings.add(name)
            log.warning("kvcore: %s %s is not a kvcore setting%s; ignored", kind, name,
                        f" (did you mean {closest}?)" if closest else "")


class CacheEngine:
    """One kvcore instance: the tiers of ``settings.tiers`` behind one API.

    Thread-safe. Create one per engine worker process; :meth:`close` stops its threads.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        registry: PluginRegistry | None = None,
        tiers: Sequence[Tier] | None = None,
        attachments: bool = True,
        memory: MemoryTier | None = None,
        role: str = "engine",
    ) -> None:
        """``attachments=False``: start none of the plugins' attachments (no controller
        reporter, no peer server), for a lookup-only instance such as vLLM's scheduler when its
        worker, which holds the KV, runs in another process. ``memory``: the memory tier to
        use instead of the first of ``settings.tiers`` (the cache server's shared one).
        ``role``: what this instance is to the controller (``engine``, or ``cache-server``)."""
        self.settings = settings or load_settings()
        self.role = role
        self.stats_sections: dict[str, Callable[[], Any]] = {}
        """Sections others add to :meth:`stats` (the cache server's attached clients)."""
        self.pending = PendingStores()
        """Keys queued or being stored (a peer server waits for them instead of missing)."""
        logs.configure(self.settings.log_level)
        self.registry = registry or get_registry(self.settings.plugins)
        _warn_unknown_settings(self.registry)
        self.metrics = Metrics()
        self.chunk_size = self.settings.chunk_size
        self.history = ChunkHistory(self.settings.chunk_history_size)
        """The latest fate of each chunk in each tier (why a later lookup misses)."""
        self.requests = RequestLog(self.settings.request_log_size)
        """The last requests looked up or loaded with a request id, and why they missed."""
        self.namespaces = NamespaceBook()
        """The namespaces connectors declared and the ones keys were derived from."""
        self.recorder = MissRecorder(self.history, self.requests, self.metrics,
                                     self.chunk_size, self.namespaces)
        self.planner = Planner(self.settings.planner)
        """Load or recompute: the measured cost of each lower tier and of the engine's prefill."""
        self._observers: list[Callable[[str, str, list[ChunkKey]], None]] = []
        built = list(tiers) if tiers is not None else self._build_tiers(memory)
        first = built[0]
        if not isinstance(first, MemoryTier):
            if tiers is None:
                for tier in built:
                    tier.close()
            raise ConfigError(
                f"KVCORE_TIERS={','.join(self.settings.tiers)!r}: the first tier must be a "
                "memory tier, such as 'cpu' (lower tiers follow it, for example cpu,lmdb)"
            )
        self.memory: MemoryTier = first
        """The memory tier: every load is served from it, every store lands in it first."""
        self.planner.memory = first.name
        self.codecs = CodecContext(self.registry)
        """Codecs of the lower tiers and what they need to know (namespace element types)."""
        try:
            lower = [self._lower(t) for t in built[1:]]
        except BaseException:
            for tier in built:
                tier.close()
            raise
        self.stack = TierStack(first, lower, self.metrics, self.codecs, self.history)
        for tier in built:
            if tier._notify is None:  # tiers given ready-made report like built ones
                tier._notify = self._notify
        self.pipeline = Pipeline(self.stack, self.settings, self.metrics, self.pending)
        self.attachments = Attachments()
        """What runs beside this engine, by name (``engine.attachments["controller"]``)."""
        if attachments:
            try:
                self.attachments.start(self, self.registry.attachments)
            except BaseException:
                self.close()
                raise
        log.info("kvcore engine: tiers %s, chunk %d tokens, CPU budget %d bytes, policy %s",
                 ",".join(t.name for t in self.tiers), self.chunk_size, self.memory.budget,
                 self.settings.eviction)

    def _lower(self, tier: Tier) -> LowerTier:
        variable = f"KVCORE_{tier.name.upper()}_CODEC"
        codec = self.codecs.configured(str(getattr(tier, "codec", "none")), variable)
        return LowerTier(tier, self.settings.tier_timeout_s, self.metrics,
                         self.settings.background_nice, codec=codec, codecs=self.codecs,
                         max_raw_bytes=self.memory.budget, history=self.history,
                         cost=self.planner.tier(tier.name))

    def _build_tiers(self, memory: MemoryTier | None) -> list[Tier]:
        """The tiers of ``settings.tiers`` (``memory`` or the cache server's standing in for
        the first); when one fails to build, those already built are closed before the error
        propagates. Behind a cache server the server owns every tier: the engine builds
        none."""
        policy_factory = self.registry.policy_factory(self.settings.eviction)
        tiers: list[Tier] = [memory] if memory is not None else []
        server = (_server_tier(self.settings, self.planner, self.namespaces)
                  if memory is None else None)
        if server is not None:
            if self.settings.tiers[1:]:
                log.info("kvcore engine: behind the cache server, whose tiers (KVCORE_TIERS "
                         "of its environment) serve this engine: %s are the server's",
                         ",".join(self.settings.tiers[1:]))
            return [server]
        try:
            for name in self.settings.tiers[len(tiers):]:
                factory = self.registry.tier_factory(name)
                memory = tiers[0] if tiers and isinstance(tiers[0], MemoryTier) else None
                context = TierContext(name, self.settings, policy_factory, self._notify,
                                      memory=memory)
                tier = factory(context)
                tier.name = name
                tiers.append(tier)
        except BaseException:
            for built in reversed(tiers):
                try:
                    built.close()
                except Exception as exc:  # noqa: BLE001 - the construction error matters more
                    log.warning("kvcore tier %s: close failed: %s", built.name, exc)
            raise
        return tiers

    def add_lower_tier(self, tier: Tier) -> None:
        """Append a tier below the others, with its write-behind (tests, embedding)."""
        lower = self._lower(tier)
        self.stack.lower.append(lower)
        self.pipeline.add_write_behind(lower)

    @property
    def lower(self) -> list[LowerTier]:
        """The tiers below memory, fastest first."""
        return self.stack.lower

    @property
    def tiers(self) -> list[Tier]:
        return self.stack.tiers

    # -- observers (control plane) --------------------------------------------------------------

    def subscribe(self, observer: Callable[[str, str, list[ChunkKey]], None]) -> None:
        """Call ``observer(tier, "admit" | "evict", keys)`` on every admission and eviction."""
        self._observers.append(observer)
        self.memory._notify = self._notify

    def _notify(self, tier: str, kind: str, keys: list[ChunkKey]) -> None:
        self.metrics.inc("chunks_admitted_total" if kind == "admit" else "evictions_total",
                         len(keys), tier)
        if kind == "admit":
            self.history.note(tier, "stored", keys)
        elif kind == "corrupt":
            self.history.note(tier, "corrupt", keys)
        else:
            self.history.note(tier, "evicted", keys, policy=self._policy_of(tier))
        kind = "admit" if kind == "admit" else "evict"  # observers see chunks come and go
        for observer in list(self._observers):
            try:
                observer(tier, kind, keys)
            except Exception as exc:  # noqa: BLE001 - an observer never fails the engine
                log.debug("kvcore observer failed: %s", exc)

    def _policy_of(self, tier: str) -> str:
        """The eviction policy a tier evicts by (empty when the tier evicts on its own)."""
        stack: TierStack | None = getattr(self, "stack", None)  # tiers may report while built
        for t in stack.tiers if stack is not None else []:
            if t.name == tier:
                return str(getattr(getattr(t, "policy", None), "name", ""))
        return ""

    # -- keys ------------------------------------------------------------------------------------

    def keys_for(self, namespace: Namespace | bytes,
                 tokens: Sequence[int] | np.ndarray) -> list[ChunkKey]:
        """Keys of the full chunks of ``tokens`` under ``namespace`` (or its digest)."""
        if isinstance(namespace, Namespace):
            self.codecs.note_namespace(namespace)
            self.namespaces.remember(namespace)
        return chunk_keys(namespace, tokens, self.chunk_size)

    def declare_namespace(self, namespace: Namespace, served_as: Sequence[str] = (),
                          keyed_by: KeyedBy = "tokens") -> None:
        """A namespace this engine serves and the model names clients know it by (vLLM's
        served model name): the controller lists it and routes requests by those names. Its
        tenants' namespaces inherit the names. ``keyed_by="engine"`` for keys that are not
        :func:`~kvcore.keys.chunk_keys` of token ids (SGLang's page hashes)."""
        self.codecs.note_namespace(namespace)
        self.namespaces.declare(namespace, served_as, keyed_by)

    def note_namespace(self, namespace: Namespace) -> None:
        """Tell the codecs ``namespace``'s element type, for a connector that derives keys by
        digest (a chunk whose namespace is not known is stored raw)."""
        self.codecs.note_namespace(namespace)
        self.namespaces.remember(namespace)

    # -- lookup ------------------------------------------------------------------------------------

    def lookup(self, keys: Sequence[ChunkKey], prefetch: bool = True,
               request_id: str | None = None,
               tokens: Sequence[int] | None = None) -> LookupResult:
        """How many leading chunks are cached in any tier. Starts prefetch of lower-tier hits.

        With ``request_id``, the lookup is recorded in :attr:`requests` with the reason the
        first missing chunk missed; ``tokens`` (the prompt) lets that reason name another
        tenant holding the same prefix.
        """
        started = time.perf_counter()
        keys = list(keys)
        source = self.stack.locate(keys)
        found = next((i for i, s in enumerate(source) if s is None), len(keys))
        plan = self.planner.plan([s for s in source[:found] if s is not None], self.chunk_size,
                                 len(tokens) if tokens is not None else len(keys) * self.chunk_size)
        n = plan.claim
        result = LookupResult(n, self.chunk_size, found=found)
        for name in source[:n]:
            assert name is not None  # the first n chunks all have a source
            result.by_tier[name] = result.by_tier.get(name, 0) + 1
        in_memory = [k for k, s in zip(keys[:found], source[:found]) if s == self.memory.name]
        if in_memory:
            self.memory.touch(in_memory)
        if self.lower:
            again = set(self.pipeline.admission.asked(keys, found))
            self.pipeline.copy_down([k for k in in_memory if k in again])
        below = [i for i in range(n) if source[i] != self.memory.name]
        if prefetch and below and self.lower:  # a fronting memory tier prefetches itself
            self.pipeline.prefetch([keys[i] for i in below],
                                   {keys[i]: (keys[i - 1] if i else None) for i in below})
        result.sources = [s for s in source[:n] if s is not None]
        if request_id is not None:
            self.recorder.lookup(request_id, keys, n, result.by_tier, result.sources, tokens,
                                 plan, self.stack.locate)
        self.metrics.inc("lookups_total")
        self.metrics.inc("hit_tokens_total", n * self.chunk_size)
        self.metrics.inc("miss_tokens_total", (len(keys) - n) * self.chunk_size)
        self.metrics.observe("lookup_seconds", time.perf_counter() - started)
        return result

    def observe_prefill(self, steps: list[tuple[int, int]], seconds: float) -> None:
        """An engine's forward step took ``seconds`` computing, for each request,
        ``(context tokens before, new tokens)``: the planner's model of recomputing."""
        self.planner.prefill.observe(steps, seconds)

    def lookup_tokens(self, namespace: Namespace, tokens: Sequence[int]) -> int:
        """Leading cached tokens of a prompt (a multiple of the chunk size)."""
        return self.lookup(self.keys_for(namespace, tokens)).tokens

    def prefetch(self, keys: Sequence[ChunkKey]) -> Future:
        """Copy chunks found in lower tiers into memory in the background."""
        keys = list(keys)
        return self.pipeline.prefetch(keys, {k: (keys[i - 1] if i else None)
                                             for i, k in enumerate(keys)})

    # -- store -------------------------------------------------------------------------------------

    def store(self, keys: Sequence[ChunkKey], source: ChunkSource) -> StoreHandle:
        """Store chunk ``i`` of ``source`` under ``keys[i]``, asynchronously.

        ``keys`` is a prefix in order (chunk i's parent is chunk i-1). Chunks already cached are
        skipped. Returns at once; if the queue is full the store is dropped (counted).
        """
        return self.pipeline.store(keys, source)

    def store_buffers(self, keys: Sequence[ChunkKey], buffers: Sequence[Buffer]) -> StoreHandle:
        """Store ready byte buffers (copied, asynchronously)."""
        return self.store(keys, BufferSource(buffers))

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until queued stores and write-behind are done (tests, shutdown)."""
        return self.pipeline.flush(timeout)

    # -- retrieve ----------------------------------------------------------------------------------

    def acquire(self, keys: Sequence[ChunkKey], timeout_s: float | None = None,
                request_id: str | None = None, first_chunk: int = 0) -> ChunkLease:
        """Hold the leading cached chunks of ``keys`` and return views of them (zero copy).

        Chunks missing from memory are read from lower tiers (waiting for a prefetch in flight,
        at most ``timeout_s``), verified and promoted. Close the lease when the copy is done.
        With ``request_id`` (``keys`` being that request's chunks from ``first_chunk`` on),
        the load is added to the request's record, with the reason when it falls short.
        """
        keys = list(keys)
        in_time, timeouts = True, self.stack.timeouts()
        views = self.memory.acquire(keys)
        if (self.lower or self.memory.below) and any(v is None for v in views):
            first_gap = next(i for i, v in enumerate(views) if v is None)
            self.memory.release(views[first_gap:])
            views[first_gap:] = [None] * (len(keys) - first_gap)
            wait_s = timeout_s or self.settings.tier_timeout_s
            try:
                if self.memory.below:  # its owner reads them (and times it for the planner)
                    started = time.perf_counter()
                    self.memory.fill(keys[first_gap:], [keys[i - 1] if i else None
                                                        for i in range(first_gap, len(keys))],
                                     wait_s)
                    in_time = time.perf_counter() - started <= wait_s
                if self.lower:
                    in_time = self.pipeline.wait_inflight(keys[first_gap:], wait_s)
                    parents = {k: (keys[i - 1] if i else None) for i, k in enumerate(keys)}
                    self.stack.promote(keys[first_gap:], parents)
                views[first_gap:] = self.memory.acquire(keys[first_gap:])
            except BaseException:
                self.memory.release(views)  # no hold outlives a failed acquire
                raise
        n = 0
        while n < len(views) and views[n] is not None:
            n += 1
        self.memory.release(views[n:])
        leased = [v for v in views[:n] if v is not None]
        self.metrics.inc("bytes_loaded_total", sum(v.nbytes for v in leased), self.memory.name)
        if request_id is not None:
            late = not in_time or self.stack.timeouts() > timeouts
            self.recorder.load(request_id, keys, n, first_chunk, late)
        return ChunkLease(self.memory, keys[:n], leased)

    def retrieve(self, keys: Sequence[ChunkKey], dests: Sequence[Any]) -> int:
        """Copy the leading cached chunks into ``dests``; return how many were copied."""
        with self.acquire(keys) as lease:
            for dest, array in zip(dests, lease.arrays()):
                np.copyto(np.frombuffer(memoryview(dest).cast("B"), dtype=np.uint8), array)
            return len(lease)

    # -- management --------------------------------------------------------------------------------

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        """Remove chunks from every tier; return how many copies were removed."""
        return self.stack.delete(keys)

    def pin(self, keys: Sequence[ChunkKey]) -> int:
        """Keep chunks through eviction in every tier that supports pinning."""
        return self.stack.pin(keys)

    def unpin(self, keys: Sequence[ChunkKey]) -> int:
        return self.stack.unpin(keys)

    def clear(self, namespace: Namespace | bytes | None = None, tier: str | None = None) -> int:
        """Remove every chunk (of one namespace, in one tier, when given)."""
        return self.stack.clear(namespace, tier)

    def stats(self) -> dict[str, Any]:
        """Tier usage plus metrics. A lower tier's usage is read with the same bounded wait as
        every other lower-tier call (a tier that does not answer reports an error)."""
        sections = {name: section() for name, section in list(self.stats_sections.items())}
        return {"tiers": self.stack.usage(), **self.metrics.snapshot(), **sections}

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self.pipeline.closed

    def close(self) -> None:
        """Close the attachments, finish queued work briefly, stop threads, close tiers."""
        if self.pipeline.closed:
            return
        self.attachments.close()
        self.pipeline.close()
        self.stack.close()

    def __enter__(self) -> CacheEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def open_engine(**overrides: Any) -> Iterator[CacheEngine]:
    """A :class:`CacheEngine` from settings (environment, file, ``overrides``), closed on exit."""
    engine = CacheEngine(load_settings(**overrides))
    try:
        yield engine
    finally:
        engine.close()
