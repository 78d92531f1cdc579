"""The asynchronous work of an engine: stores, write-behind and prefetches.

- **Stores**: :meth:`Pipeline.store` returns at once; one store thread reserves memory-tier
  buffers, asks the caller's :class:`ChunkSource` to fill them (one batched gather), commits
  them, and hands the stored keys to every :class:`WriteBehind`.
- **Write-behind**: one worker object (and thread) per lower tier copies stored chunks down.
- **Prefetches**: a small pool promotes chunks found below memory (the lookup that found them
  starts it), and a load waits for the prefetch in flight instead of reading twice.

Every queue is bounded: a store or a write-behind that finds its queue full is dropped and
counted, never waited for. :meth:`Pipeline.flush` waits for queued work; :meth:`Pipeline.close`
stops the threads.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from kvcore.admission import LowerAdmission
from kvcore.background import lower_priority
from kvcore.config import Settings
from kvcore.interfaces import Buffer
from kvcore.keys import ChunkKey
from kvcore.metrics import Metrics
from kvcore.pending import PendingStores
from kvcore.tier_stack import LowerTier, TierStack

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
class StoreHandle:
    """Completion of an asynchronous store: ``wait()`` returns how many chunks were stored."""

    future: Future

    def wait(self, timeout: float | None = None) -> int:
        return self.future.result(timeout)

    def done(self) -> bool:
        return self.future.done()


class WriteBehind:
    """Copies stored chunks from memory into one lower tier, in its own thread."""

    def __init__(self, stack: TierStack, tier: LowerTier, chunk_size: int, queue_size: int,
                 metrics: Metrics, nice: int, closed: threading.Event) -> None:
        self.stack = stack
        self.tier = tier
        self.chunk_size = chunk_size
        self.metrics = metrics
        self.queue: queue.Queue[list[ChunkKey]] = queue.Queue(maxsize=queue_size)
        self._nice = nice
        self._closed = closed
        self.thread = threading.Thread(target=self._run, name=f"kvcore-behind-{tier.name}",
                                       daemon=True)
        self.thread.start()

    def offer(self, keys: list[ChunkKey]) -> None:
        """Queue ``keys`` for this tier; dropped (counted) when the queue is full."""
        try:
            self.queue.put_nowait(keys)
        except queue.Full:
            self.metrics.inc("write_behind_dropped_total", len(keys))

    def _run(self) -> None:
        lower_priority(self._nice)
        while not self._closed.is_set():
            try:
                keys = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                self._write(keys)
            except Exception as exc:  # noqa: BLE001 - a failed copy is a future miss
                log.warning("kvcore write-behind to %s failed: %s", self.tier.name, exc)
            finally:
                self.queue.task_done()

    def _write(self, keys: list[ChunkKey]) -> None:
        memory = self.stack.memory
        codecs = self.stack.codecs
        if codecs is not None:  # replaced meanwhile by a lossy load: not what was computed
            keys = [k for k in keys if codecs.loaded_codec(k) is None]
        views = memory.acquire(keys)
        held = [(k, v) for k, v in zip(keys, views) if v is not None]
        try:
            if held:
                self.tier.put(held, self.chunk_size)
        finally:
            memory.release(views)


class Pipeline:
    """Stores, write-behind and prefetches of one engine."""

    def __init__(self, stack: TierStack, settings: Settings, metrics: Metrics,
                 pending: PendingStores) -> None:
        self.stack = stack
        self.settings = settings
        self.metrics = metrics
        self.pending = pending
        self.chunk_size = settings.chunk_size
        self._closed = threading.Event()
        self._store_queue: queue.Queue = queue.Queue(maxsize=settings.store_queue_size)
        self.admission = LowerAdmission(settings.lower_admission)
        self.write_behind: list[WriteBehind] = []
        for tier in stack.lower:
            self.add_write_behind(tier)
        self._inflight: dict[ChunkKey, Future] = {}
        self._inflight_lock = threading.Lock()
        self._prefetch_pool = ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="kvcore-fetch", initializer=lower_priority,
            initargs=(settings.background_nice,))
        self._store_thread = threading.Thread(target=self._store_worker, name="kvcore-store",
                                              daemon=True)
        self._store_thread.start()
        self._warned_chunk_too_large = False

    def add_write_behind(self, tier: LowerTier) -> WriteBehind:
        """Start copying stored chunks into ``tier`` (one per lower tier)."""
        worker = WriteBehind(self.stack, tier, self.chunk_size,
                             4 * self.settings.store_queue_size, self.metrics,
                             self.settings.background_nice, self._closed)
        self.write_behind.append(worker)
        return worker

    # -- stores ------------------------------------------------------------------------------

    def store(self, keys: Sequence[ChunkKey], source: ChunkSource) -> StoreHandle:
        """Queue a store of chunk ``i`` of ``source`` under ``keys[i]``; dropped (counted) when
        the queue is full."""
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
            except Exception as exc:  # noqa: BLE001 - a failed store is counted, never raised
                self.metrics.inc("store_errors_total")
                log.warning("kvcore store failed: %s: %s", type(exc).__name__, exc)
                future.set_result(0)
            finally:
                self.pending.remove(keys)
                self._store_queue.task_done()

    def _store_now(self, keys: list[ChunkKey], source: ChunkSource) -> int:
        started = time.perf_counter()
        memory = self.stack.memory
        present = memory.contains(keys)
        nbytes = source.chunk_nbytes()
        if nbytes > memory.budget and not self._warned_chunk_too_large:
            self._warned_chunk_too_large = True
            log.warning("kvcore: KVCORE_CPU_SIZE=%d bytes is smaller than one chunk (%d bytes): "
                        "nothing can be stored; raise KVCORE_CPU_SIZE or lower "
                        "KVCORE_CHUNK_SIZE", memory.budget, nbytes)
        indices, dests, reserved = [], [], []
        wanted = [i for i in range(len(keys)) if not present[i]]
        bufs = memory.reserve_many([keys[i] for i in wanted], nbytes,
                                   [keys[i - 1] if i else None for i in wanted])
        for i, buf in zip(wanted, bufs):
            if buf is None:
                self.metrics.inc("store_rejected_chunks_total")
                continue
            indices.append(i)
            dests.append(buf)
            reserved.append(keys[i])
        if not reserved:
            return 0
        try:
            source.fill(indices, dests)
        except Exception:
            for key in reserved:
                memory.abort(key)
            raise
        if self.stack.codecs is not None:
            self.stack.codecs.forget(reserved)  # fresh KV: exact, whatever an old copy was
        for key in reserved:
            memory.commit(key)
        self.metrics.inc("stored_chunks_total", len(reserved))
        self.metrics.inc("bytes_stored_total", nbytes * len(reserved), memory.name)
        self.metrics.observe("store_seconds", time.perf_counter() - started)
        self._write_behind(reserved)
        return len(reserved)

    def stored(self, keys: list[ChunkKey]) -> None:
        """Chunks another process stored into this engine's memory tier (an engine attached to
        the cache server): fresh KV, written behind as if stored here."""
        if self.stack.codecs is not None:
            self.stack.codecs.forget(keys)
        self.metrics.inc("stored_chunks_total", len(keys))
        self._write_behind(keys)

    def _write_behind(self, stored: list[ChunkKey]) -> None:
        admitted = self.admission.admit(stored)
        self._note_not_admitted(stored, admitted)
        self.copy_down(admitted)

    def _note_not_admitted(self, stored: list[ChunkKey], admitted: list[ChunkKey]) -> None:
        """Tell the history which stored chunks write-behind leaves out (why a later miss
        finds them in no lower tier)."""
        history = self.stack.history
        if history is None or len(admitted) == len(stored) or not self.stack.lower:
            return
        chosen = set(admitted)
        refused = [k for k in stored if k not in chosen]
        for tier in self.stack.lower:
            history.note(tier.name, "not_admitted", refused,
                         policy=f"KVCORE_LOWER_ADMISSION={self.admission.mode}")

    def copy_down(self, keys: list[ChunkKey]) -> None:
        """Queue chunks in memory for every lower tier (when write-behind is on)."""
        if keys and self.settings.write_behind:
            for worker in self.write_behind:
                worker.offer(keys)

    # -- prefetches ----------------------------------------------------------------------------

    def prefetch(self, keys: list[ChunkKey], parents: dict[ChunkKey, ChunkKey | None]) -> Future:
        """Promote ``keys`` into memory in the background (keys already in flight join the
        prefetch that has them)."""
        with self._inflight_lock:
            todo = [k for k in keys if k not in self._inflight]
            future = self._prefetch_pool.submit(self._promote, todo, parents)
            for key in todo:
                self._inflight[key] = future
        return future

    def _promote(self, keys: list[ChunkKey], parents: dict[ChunkKey, ChunkKey | None]) -> int:
        try:
            return self.stack.promote(keys, parents)
        finally:
            with self._inflight_lock:
                for key in keys:
                    self._inflight.pop(key, None)

    def wait_inflight(self, keys: Sequence[ChunkKey], timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) for the prefetches that hold any of ``keys``; False
        when one of them did not finish in time."""
        with self._inflight_lock:
            futures = {id(f): f for k in keys if (f := self._inflight.get(k)) is not None}
        deadline = time.monotonic() + timeout_s
        in_time = True
        for future in futures.values():
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                in_time = False
            except Exception:  # noqa: BLE001 - a failed prefetch: the load reads itself
                pass
        return in_time

    # -- lifecycle -------------------------------------------------------------------------------

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until queued stores and write-behind are done (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            queues = [self._store_queue, *(w.queue for w in self.write_behind)]
            if all(q.unfinished_tasks == 0 for q in queues):
                memory = self.stack.memory  # a fronting memory tier's owner writes behind
                return not memory.below or memory.flush(deadline - time.monotonic())
            time.sleep(0.005)
        return False

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        """Finish queued work briefly, then stop every thread."""
        if self._closed.is_set():
            return
        self.flush(timeout=5.0)
        self._closed.set()
        for thread in [self._store_thread, *(w.thread for w in self.write_behind)]:
            thread.join(timeout=2.0)
        self._prefetch_pool.shutdown(wait=False, cancel_futures=True)
