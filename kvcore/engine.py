"""The cache engine: lookup, store, retrieve, prefetch, delete, pin across the configured tiers.

The first tier is the memory tier (a :class:`~kvcore.interfaces.MemoryTier`; the in-process CPU
tier by default); every tier after it comes from a plugin and is used through the
:class:`~kvcore.interfaces.Tier` interface only, with no special cases:

- **lookup** counts the leading run of chunks held by any tier (no data moves) and starts a
  prefetch of those found only below the CPU tier, so the load that follows finds them in memory;
- **store** returns at once; a worker thread reserves CPU buffers, asks the caller's source to
  fill them (one batched gather), commits them, and queues them for write-behind to lower tiers;
- **retrieve** / :meth:`CacheEngine.acquire` hand out the leading run of chunks, reading lower
  tiers (verified, promoted into the CPU tier) where memory misses;
- every lower-tier call runs with a bounded wait; an error, a timeout or a corrupted value is a
  miss, logged once per tier and counted, never an exception to the caller.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from kvcore import chunk_format, logs
from kvcore.background import lower_priority
from kvcore.config import ConfigError, Settings, load_settings, unknown_variables
from kvcore.failures import FailureLog
from kvcore.interfaces import Buffer, MemoryTier, Tier, TierContext
from kvcore.keys import ChunkKey, Namespace, chunk_keys, key_namespace
from kvcore.metrics import Metrics
from kvcore.pending import PendingStores
from kvcore.plugins import PluginRegistry, get_registry

log = logging.getLogger("kvcore.engine")


class ChunkSource(Protocol):
    """Where an asynchronous store reads chunk bytes from (for example an engine's paged KV).

    The caller must keep the source's memory valid until the store handle completes.
    """

    def chunk_nbytes(self) -> int:
        """Bytes of one chunk (all chunks of a store are the same size)."""
        ...

    def fill(self, indices: Sequence[int], dests: Sequence[np.ndarray]) -> None:
        """Copy chunk ``indices[j]`` into ``dests[j]`` for every j, ideally in one batched call."""
        ...


class BufferSource:
    """A :class:`ChunkSource` over ready byte buffers, one per chunk."""

    def __init__(self, buffers: Sequence[Buffer]) -> None:
        self.buffers = [np.frombuffer(memoryview(b).cast("B"), dtype=np.uint8) for b in buffers]

    def chunk_nbytes(self) -> int:
        return self.buffers[0].nbytes if self.buffers else 0

    def fill(self, indices: Sequence[int], dests: Sequence[np.ndarray]) -> None:
        for i, dest in zip(indices, dests):
            dest[:] = self.buffers[i]


@dataclass
class LookupResult:
    """Leading chunks found: in total and by the tier that answered first for each."""

    chunks: int
    chunk_size: int
    by_tier: dict[str, int] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    """For each of the leading ``chunks``, the name of the first tier that holds it."""

    @property
    def tokens(self) -> int:
        return self.chunks * self.chunk_size


@dataclass
class StoreHandle:
    """Completion of an asynchronous store: ``wait()`` returns how many chunks were stored."""

    future: Future

    def wait(self, timeout: float | None = None) -> int:
        return self.future.result(timeout)

    def done(self) -> bool:
        return self.future.done()


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


class _LowerTier:
    """A lower tier with bounded waits, framing, and once-per-kind error logging."""

    def __init__(self, tier: Tier, timeout_s: float, metrics: Metrics, nice: int = 0) -> None:
        self.tier = tier
        self.name = tier.name
        self.timeout_s = timeout_s
        self.metrics = metrics
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"kvcore-{tier.name}",
                                        initializer=lower_priority, initargs=(nice,))
        self.failures = FailureLog(log, "treated as a miss", prefix=f"kvcore tier {tier.name}: ",
                                   metrics=metrics, counter="tier_errors_total", label=tier.name)

    def call(self, what: str, fn: Callable[..., Any], *args: Any, default: Any) -> Any:
        started = time.perf_counter()
        try:
            result = self._pool.submit(fn, *args).result(timeout=self.timeout_s)
        except FutureTimeout:
            self.failures.record(what, f"no answer within {self.timeout_s}s")
            return default
        except Exception as exc:
            self.failures.record(what, exc)
            return default
        self.metrics.observe(f"tier_{what}_seconds", time.perf_counter() - started, self.name)
        return result

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        found = self.call("contains", self.tier.contains, list(keys), default=None)
        return list(found) if found is not None and len(found) == len(keys) else [False] * len(keys)

    def get_verified(self, keys: Sequence[ChunkKey]) -> list[memoryview | None]:
        values = self.call("get", self.tier.get, list(keys), default=None)
        if values is None or len(values) != len(keys):
            return [None] * len(keys)
        out: list[memoryview | None] = []
        corrupt: list[ChunkKey] = []
        for key, value in zip(keys, values):
            payload = chunk_format.decode(key, value) if self.tier.framed else (
                memoryview(value).cast("B") if value is not None else None
            )
            if value is not None and payload is None:
                corrupt.append(key)
            if payload is not None:
                self.metrics.inc("bytes_loaded_total", payload.nbytes, self.name)
            out.append(payload)
        if corrupt:
            self.metrics.inc("corrupt_chunks_total", len(corrupt), self.name)
            self.failures.record("verify", f"{len(corrupt)} corrupted or foreign chunk(s) removed")
            self.call("delete", self.tier.delete, corrupt, default=0)
        return out

    def put(self, items: Sequence[tuple[ChunkKey, memoryview]], tokens: int) -> int:
        framed = [
            (key, chunk_format.encode(key, view, tokens) if self.tier.framed else [view])
            for key, view in items
        ]
        stored = self.call("put", self.tier.put, framed, default=None)
        accepted = [v for (_, v), ok in zip(items, stored or []) if ok]
        self.metrics.inc("bytes_stored_total", sum(v.nbytes for v in accepted), self.name)
        return len(accepted)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        try:
            self.tier.close()
        except Exception as exc:
            log.warning("kvcore tier %s: close failed: %s", self.name, exc)


_warned_variables: set[str] = set()


def _warn_unknown_variables(registry: PluginRegistry) -> None:
    """One warning per process and variable for a ``KVCORE_*`` variable nothing declares (a
    typo would silently keep the default; ``kvcore config`` rejects it)."""
    for variable, closest in unknown_variables([Settings, *registry.settings.values()]):
        if variable not in _warned_variables:
            _warned_variables.add(variable)
            log.warning("kvcore: %s is not a kvcore setting%s; ignored", variable,
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
        serve_memory: bool = True,
    ) -> None:
        """``serve_memory=False``: lower tiers must not offer this instance's memory tier to
        peers (a lookup-only instance, such as vLLM's scheduler when its worker runs
        elsewhere)."""
        self.settings = settings or load_settings()
        self._serve_memory = serve_memory
        self.pending = PendingStores()
        """Keys queued or being stored (a peer server waits for them instead of missing)."""
        logs.configure(self.settings.log_level)
        self.registry = registry or get_registry(self.settings.plugins)
        _warn_unknown_variables(self.registry)
        self.metrics = Metrics()
        self.chunk_size = self.settings.chunk_size
        self._observers: list[Callable[[str, str, list[ChunkKey]], None]] = []
        built = list(tiers) if tiers is not None else self._build_tiers()
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
        nice = self.settings.background_nice
        self.lower = [_LowerTier(t, self.settings.tier_timeout_s, self.metrics, nice)
                      for t in built[1:]]
        self._store_queue: queue.Queue = queue.Queue(maxsize=self.settings.store_queue_size)
        self._behind_queues: list[queue.Queue] = [
            queue.Queue(maxsize=4 * self.settings.store_queue_size) for _ in self.lower]
        self._inflight: dict[ChunkKey, Future] = {}
        self._inflight_lock = threading.Lock()
        self._prefetch_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvcore-fetch",
                                                 initializer=lower_priority, initargs=(nice,))
        self._closed = threading.Event()
        self._threads = [threading.Thread(target=self._store_worker, name="kvcore-store",
                                          daemon=True)]
        for i in range(len(self.lower)):
            self._threads.append(threading.Thread(
                target=self._behind_worker, args=(i,), name=f"kvcore-behind-{i}", daemon=True))
        for thread in self._threads:
            thread.start()
        self._warned_chunk_too_large = False
        log.info("kvcore engine: tiers %s, chunk %d tokens, CPU budget %d bytes, policy %s",
                 ",".join(t.name for t in self.tiers), self.chunk_size, self.memory.budget,
                 self.settings.eviction)

    def _build_tiers(self) -> list[Tier]:
        """The tiers of ``settings.tiers``; when one fails to build, those already built are
        closed before the error propagates."""
        policy_factory = self.registry.policy_factory(self.settings.eviction)
        tiers: list[Tier] = []
        try:
            for name in self.settings.tiers:
                factory = self.registry.tier_factory(name)
                memory = tiers[0] if tiers and isinstance(tiers[0], MemoryTier) else None
                context = TierContext(name, self.settings, policy_factory, self._notify,
                                      memory=memory, serve_memory=self._serve_memory,
                                      pending=self.pending if memory is not None else None)
                tier = factory(context)
                tier.name = name
                tiers.append(tier)
        except BaseException:
            for built in reversed(tiers):
                try:
                    built.close()
                except Exception as exc:
                    log.warning("kvcore tier %s: close failed: %s", built.name, exc)
            raise
        return tiers

    # -- observers (control plane) --------------------------------------------------------------

    def subscribe(self, observer: Callable[[str, str, list[ChunkKey]], None]) -> None:
        """Call ``observer(tier, "admit" | "evict", keys)`` on every admission and eviction."""
        self._observers.append(observer)
        self.memory._notify = self._notify

    def _notify(self, tier: str, kind: str, keys: list[ChunkKey]) -> None:
        self.metrics.inc("chunks_admitted_total" if kind == "admit" else "evictions_total",
                         len(keys), tier)
        for observer in list(self._observers):
            try:
                observer(tier, kind, keys)
            except Exception as exc:
                log.debug("kvcore observer failed: %s", exc)

    # -- keys ------------------------------------------------------------------------------------

    def keys_for(self, namespace: Namespace | bytes,
                 tokens: Sequence[int] | np.ndarray) -> list[ChunkKey]:
        """Keys of the full chunks of ``tokens`` under ``namespace`` (or its digest)."""
        return chunk_keys(namespace, tokens, self.chunk_size)

    # -- lookup ------------------------------------------------------------------------------------

    def lookup(self, keys: Sequence[ChunkKey], prefetch: bool = True) -> LookupResult:
        """How many leading chunks are cached in any tier. Starts prefetch of lower-tier hits."""
        started = time.perf_counter()
        keys = list(keys)
        result = LookupResult(0, self.chunk_size)
        # source[i]: the first tier (fastest first) that holds chunk i, None where none does
        source: list[str | None] = [self.memory.name if hit else None
                                    for hit in self.memory.contains(keys)]
        first_gap = next((i for i, s in enumerate(source) if s is None), len(keys))
        missing = [i for i in range(first_gap, len(keys)) if source[i] is None]
        for tier in self.lower:
            if not missing:
                break
            hits = tier.contains([keys[i] for i in missing])
            for i, hit in zip(missing, hits):
                if hit:
                    source[i] = tier.name
            missing = [i for i, hit in zip(missing, hits) if not hit]
        n = next((i for i, s in enumerate(source) if s is None), len(keys))
        for name in source[:n]:
            assert name is not None  # the first n chunks all have a source
            result.by_tier[name] = result.by_tier.get(name, 0) + 1
        in_memory = [k for k, s in zip(keys[:n], source[:n]) if s == self.memory.name]
        if in_memory:
            self.memory.touch(in_memory)
        below = [i for i in range(n) if source[i] != self.memory.name]
        if prefetch and below:
            self._start_prefetch([keys[i] for i in below],
                                 {keys[i]: (keys[i - 1] if i else None) for i in below})
        result.chunks = n
        result.sources = [s for s in source[:n] if s is not None]
        self.metrics.inc("lookups_total")
        self.metrics.inc("hit_tokens_total", n * self.chunk_size)
        self.metrics.inc("miss_tokens_total", (len(keys) - n) * self.chunk_size)
        self.metrics.observe("lookup_seconds", time.perf_counter() - started)
        return result

    def lookup_tokens(self, namespace: Namespace, tokens: Sequence[int]) -> int:
        """Leading cached tokens of a prompt (a multiple of the chunk size)."""
        return self.lookup(self.keys_for(namespace, tokens)).tokens

    # -- prefetch ----------------------------------------------------------------------------------

    def prefetch(self, keys: Sequence[ChunkKey]) -> Future:
        """Copy chunks found in lower tiers into the CPU tier in the background."""
        keys = list(keys)
        parents = {k: (keys[i - 1] if i else None) for i, k in enumerate(keys)}
        return self._start_prefetch(keys, parents)

    def _start_prefetch(
        self, keys: list[ChunkKey], parents: dict[ChunkKey, ChunkKey | None]
    ) -> Future:
        with self._inflight_lock:
            todo = [k for k in keys if k not in self._inflight]
            future = self._prefetch_pool.submit(self._promote, todo, parents)
            for key in todo:
                self._inflight[key] = future
        return future

    def _promote(self, keys: list[ChunkKey], parents: dict[ChunkKey, ChunkKey | None]) -> int:
        """Read ``keys`` from lower tiers and copy them into the CPU tier."""
        try:
            missing = [k for k, hit in zip(keys, self.memory.contains(keys)) if not hit]
            promoted = 0
            for tier in self.lower:
                if not missing:
                    break
                payloads = tier.get_verified(missing)
                still = []
                for key, payload in zip(missing, payloads):
                    if payload is None:
                        still.append(key)
                    elif self.memory.put_one(key, [payload], parents.get(key)):
                        promoted += 1
                        self.metrics.inc("promoted_chunks_total", label=tier.name)
                missing = still
            return promoted
        finally:
            with self._inflight_lock:
                for key in keys:
                    self._inflight.pop(key, None)

    # -- store -------------------------------------------------------------------------------------

    def store(self, keys: Sequence[ChunkKey], source: ChunkSource) -> StoreHandle:
        """Store chunk ``i`` of ``source`` under ``keys[i]``, asynchronously.

        ``keys`` is a prefix in order (chunk i's parent is chunk i-1). Chunks already cached are
        skipped. Returns at once; if the queue is full the store is dropped (counted).
        """
        future: Future = Future()
        keys = list(keys)
        self.pending.add(keys)
        try:
            self._store_queue.put_nowait((keys, source, future))
        except queue.Full:
            self.pending.remove(keys)
            self.metrics.inc("stores_dropped_total")
            future.set_result(0)
        return StoreHandle(future)

    def store_buffers(self, keys: Sequence[ChunkKey], buffers: Sequence[Buffer]) -> StoreHandle:
        """Store ready byte buffers (copied, asynchronously)."""
        return self.store(keys, BufferSource(buffers))

    def _store_worker(self) -> None:
        lower_priority(self.settings.background_nice)
        while not self._closed.is_set():
            try:
                item = self._store_queue.get(timeout=0.1)
            except queue.Empty:
                continue
            keys, source, future = item
            try:
                future.set_result(self._store_now(keys, source))
            except Exception as exc:
                self.metrics.inc("store_errors_total")
                log.warning("kvcore store failed: %s: %s", type(exc).__name__, exc)
                future.set_result(0)
            finally:
                self.pending.remove(keys)
                self._store_queue.task_done()

    def _store_now(self, keys: list[ChunkKey], source: ChunkSource) -> int:
        started = time.perf_counter()
        present = self.memory.contains(keys)
        nbytes = source.chunk_nbytes()
        if nbytes > self.memory.budget and not self._warned_chunk_too_large:
            self._warned_chunk_too_large = True
            log.warning("kvcore: KVCORE_CPU_SIZE=%d bytes is smaller than one chunk (%d bytes): "
                        "nothing can be stored; raise KVCORE_CPU_SIZE or lower "
                        "KVCORE_CHUNK_SIZE", self.memory.budget, nbytes)
        indices, dests, reserved = [], [], []
        for i, key in enumerate(keys):
            if present[i]:
                continue
            buf = self.memory.reserve(key, nbytes, keys[i - 1] if i else None)
            if buf is None:
                self.metrics.inc("store_rejected_chunks_total")
                continue
            indices.append(i)
            dests.append(buf)
            reserved.append(key)
        if not reserved:
            return 0
        try:
            source.fill(indices, dests)
        except Exception:
            for key in reserved:
                self.memory.abort(key)
            raise
        for key in reserved:
            self.memory.commit(key)
        self.metrics.inc("stored_chunks_total", len(reserved))
        self.metrics.inc("bytes_stored_total", nbytes * len(reserved), self.memory.name)
        self.metrics.observe("store_seconds", time.perf_counter() - started)
        if self.settings.write_behind:
            for q in self._behind_queues:
                try:
                    q.put_nowait(reserved)
                except queue.Full:
                    self.metrics.inc("write_behind_dropped_total", len(reserved))
        return len(reserved)

    def _behind_worker(self, index: int) -> None:
        tier, q = self.lower[index], self._behind_queues[index]
        lower_priority(self.settings.background_nice)
        while not self._closed.is_set():
            try:
                keys = q.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                self._write_behind(tier, keys)
            finally:
                q.task_done()

    def _write_behind(self, tier: _LowerTier, keys: list[ChunkKey]) -> None:
        views = self.memory.acquire(keys)
        held = [(k, v) for k, v in zip(keys, views) if v is not None]
        try:
            if held:
                tier.put(held, self.chunk_size)
        finally:
            self.memory.release(views)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until queued stores and write-behind are done (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            queues = [self._store_queue, *self._behind_queues]
            if all(q.unfinished_tasks == 0 for q in queues):
                return True
            time.sleep(0.005)
        return False

    # -- retrieve ----------------------------------------------------------------------------------

    def acquire(self, keys: Sequence[ChunkKey], timeout_s: float | None = None) -> ChunkLease:
        """Hold the leading cached chunks of ``keys`` and return views of them (zero copy).

        Chunks missing from memory are read from lower tiers (waiting for a prefetch in flight,
        at most ``timeout_s``), verified and promoted. Close the lease when the copy is done.
        """
        keys = list(keys)
        views = self.memory.acquire(keys)
        if self.lower and any(v is None for v in views):
            first_gap = next(i for i, v in enumerate(views) if v is None)
            self._wait_inflight(keys[first_gap:], timeout_s or self.settings.tier_timeout_s)
            self.memory.release(views[first_gap:])
            parents = {k: (keys[i - 1] if i else None) for i, k in enumerate(keys)}
            self._promote(keys[first_gap:], parents)
            views[first_gap:] = self.memory.acquire(keys[first_gap:])
        n = 0
        while n < len(views) and views[n] is not None:
            n += 1
        self.memory.release(views[n:])
        leased = [v for v in views[:n] if v is not None]
        loaded = sum(v.nbytes for v in leased)
        self.metrics.inc("bytes_loaded_total", loaded, self.memory.name)
        return ChunkLease(self.memory, keys[:n], leased)

    def _wait_inflight(self, keys: Sequence[ChunkKey], timeout_s: float) -> None:
        with self._inflight_lock:
            futures = {id(f): f for k in keys if (f := self._inflight.get(k)) is not None}
        deadline = time.monotonic() + timeout_s
        for future in futures.values():
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:
                pass

    def retrieve(self, keys: Sequence[ChunkKey], dests: Sequence[Any]) -> int:
        """Copy the leading cached chunks into ``dests``; return how many were copied."""
        with self.acquire(keys) as lease:
            for dest, array in zip(dests, lease.arrays()):
                np.copyto(np.frombuffer(memoryview(dest).cast("B"), dtype=np.uint8), array)
            return len(lease)

    # -- management --------------------------------------------------------------------------------

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        """Remove chunks from every tier; return how many copies were removed."""
        keys = list(keys)
        removed = self.memory.delete(keys)
        for tier in self.lower:
            removed += tier.call("delete", tier.tier.delete, keys, default=0)
        return removed

    def pin(self, keys: Sequence[ChunkKey]) -> int:
        """Keep chunks through eviction in every tier that supports pinning."""
        keys = list(keys)
        return self.memory.pin(keys) + sum(
            t.call("pin", t.tier.pin, keys, default=0) for t in self.lower)

    def unpin(self, keys: Sequence[ChunkKey]) -> int:
        keys = list(keys)
        return self.memory.unpin(keys) + sum(
            t.call("unpin", t.tier.unpin, keys, default=0) for t in self.lower)

    def clear(self, namespace: Namespace | bytes | None = None, tier: str | None = None) -> int:
        """Remove every chunk (of one namespace, in one tier, when given)."""
        ns = namespace.digest if isinstance(namespace, Namespace) else namespace
        removed = 0
        for t in self.tiers:
            if tier is not None and t.name != tier:
                continue
            keys = [k for k in t.iter_keys() if ns is None or key_namespace(k) == ns]
            if t is self.memory:
                self.memory.unpin(keys)
                removed += self.memory.delete(keys)
            else:
                lower = next(x for x in self.lower if x.tier is t)
                removed += lower.call("delete", t.delete, keys, default=0)
        return removed

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._closed.is_set()

    @property
    def tiers(self) -> list[Tier]:
        return [self.memory, *(t.tier for t in self.lower)]

    def stats(self) -> dict[str, Any]:
        """Tier usage plus metrics. A lower tier's usage is read with the same bounded wait as
        every other lower-tier call (a tier that does not answer reports an error)."""
        tiers: dict[str, Any] = {}
        sources: list[MemoryTier | _LowerTier] = [self.memory, *self.lower]
        for t in sources:
            try:
                if isinstance(t, _LowerTier):
                    u = t.call("usage", t.tier.usage, default=None)
                    if u is None:
                        tiers[t.name] = {"error": f"no usage within {t.timeout_s}s"}
                        continue
                else:
                    u = t.usage()
                tiers[t.name] = {"used_bytes": u.used_bytes, "budget_bytes": u.budget_bytes,
                                 "chunks": u.chunks}
            except Exception as exc:
                tiers[t.name] = {"error": str(exc)}
        return {"tiers": tiers, **self.metrics.snapshot()}

    def close(self) -> None:
        """Finish queued work briefly, stop threads, close tiers."""
        if self._closed.is_set():
            return
        self.flush(timeout=5.0)
        self._closed.set()
        for thread in self._threads:
            thread.join(timeout=2.0)
        self._prefetch_pool.shutdown(wait=False, cancel_futures=True)
        for tier in self.lower:
            tier.close()

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
