"""The CPU tier: a host-memory pool with a hard byte budget.

Chunks live in their own host buffers (page-locked when CUDA is present, so GPU copies can be
asynchronous). The budget counts every byte reserved, committed or not, and is checked under one
lock, so concurrent stores never exceed it. A reader :meth:`acquire`s chunks and gets read-only
views of the stored bytes (zero copy); acquired chunks are never evicted until :meth:`release`
of those views (each view is one hold, ended once).
Writers :meth:`reserve` a buffer, fill it in place (for example with a gather kernel) and
:meth:`commit` it, so a store costs exactly one copy.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from kvcore.hookspecs import hookimpl
from kvcore.interfaces import EvictionPolicy, MemoryTier, TierContext, TierUsage
from kvcore.keys import ChunkKey


def _host_allocator() -> Callable[[int], np.ndarray]:
    """Page-locked allocations when torch with CUDA is importable, plain numpy otherwise."""
    try:
        import torch

        if torch.cuda.is_available():
            return lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True).numpy()
    except Exception:  # noqa: BLE001 - no usable CUDA torch: plain numpy buffers
        pass
    return lambda n: np.empty(n, dtype=np.uint8)


class _Entry:
    __slots__ = ("buf", "size", "refs", "pinned", "ready", "parent")

    def __init__(self, size: int, parent: ChunkKey | None) -> None:
        self.buf: np.ndarray | None = None
        self.size = size
        self.refs = 0
        self.pinned = False
        self.ready = False
        self.parent = parent


class _InUse:
    """``key in busy`` for chunks that must not be evicted right now."""

    def __init__(self, entries: dict[ChunkKey, _Entry]) -> None:
        self._entries = entries

    def __contains__(self, key: object) -> bool:
        entry = self._entries.get(key) if isinstance(key, bytes) else None
        return entry is not None and entry.refs > 0


class CpuTier(MemoryTier):
    """In-process host memory: the default :class:`~kvcore.interfaces.MemoryTier`."""

    name = "cpu"

    def __init__(
        self,
        budget_bytes: int,
        policy: EvictionPolicy,
        notify: Callable[[str, str, list[ChunkKey]], None] | None = None,
        allocate: Callable[[int], np.ndarray] | None = None,
        free: Callable[[np.ndarray], None] | None = None,
    ) -> None:
        """``allocate``/``free``: where chunk buffers come from and go back to (the cache
        server's shared arena); by default host memory the garbage collector frees."""
        self.budget = budget_bytes
        self.policy = policy
        self._notify = notify
        self._alloc = allocate or _host_allocator()
        self._free = free
        self._entries: dict[ChunkKey, _Entry] = {}
        self._used = 0
        self._lock = threading.Lock()
        self._busy = _InUse(self._entries)
        self._holds: dict[int, tuple[memoryview, ChunkKey]] = {}
        """Views handed out by :meth:`acquire` and not released: id -> (view, key). The view is
        kept so its id stays unique while the hold lasts."""
        self.evictions = 0

    # -- writing -------------------------------------------------------------------------------

    def reserve(
        self, key: ChunkKey, nbytes: int, parent: ChunkKey | None = None
    ) -> np.ndarray | None:
        """A writable buffer of ``nbytes`` for ``key``, or ``None`` (present, too big, full)."""
        evicted: list[ChunkKey] = []
        with self._lock:
            if key in self._entries or nbytes > self.budget:
                return None
            if not self.policy.admit(key, nbytes, parent):
                return None
            while self._used + nbytes > self.budget:
                victim = self.policy.victim(self._busy)
                if victim is None:
                    break
                self._drop_locked(victim)
                evicted.append(victim)
            if self._used + nbytes > self.budget:
                result = None
            else:
                self._used += nbytes
                entry = _Entry(nbytes, parent)
                entry.refs = 1  # the writer holds it until commit/abort
                self._entries[key] = entry
                result = entry
        self._emit("evict", evicted)
        if result is None:
            return None
        try:
            result.buf = self._alloc(nbytes)
        except Exception:
            self.abort(key)
            raise
        return result.buf

    def commit(self, key: ChunkKey) -> None:
        """Make a reserved chunk visible to readers."""
        with self._lock:
            entry = self._entries[key]
            entry.refs -= 1
            entry.ready = True
            self.policy.insert(key, entry.size, entry.parent)
        self._emit("admit", [key])

    def abort(self, key: ChunkKey) -> None:
        """Give back a reservation that will not be committed."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._used -= entry.size
                self._give_back(entry)

    # -- reading -------------------------------------------------------------------------------

    def acquire(self, keys: Sequence[ChunkKey]) -> list[memoryview | None]:
        """Read-only views of stored chunks; each non-None one is held until :meth:`release`."""
        out: list[memoryview | None] = []
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is None or not entry.ready:
                    out.append(None)
                    continue
                assert entry.buf is not None  # a ready entry has its buffer
                entry.refs += 1
                if not entry.pinned:
                    self.policy.touch(key)
                view = entry.buf.data.toreadonly()
                self._holds[id(view)] = (view, key)
                out.append(view)
        return out

    def release(self, views: Sequence[memoryview | None]) -> None:
        """End the holds of ``views`` (from :meth:`acquire`); others are ignored."""
        with self._lock:
            for view in views:
                if view is None:
                    continue
                held = self._holds.get(id(view))
                if held is None or held[0] is not view:
                    continue
                del self._holds[id(view)]
                entry = self._entries.get(held[1])
                if entry is not None and entry.refs > 0:
                    entry.refs -= 1

    # -- Tier interface ------------------------------------------------------------------------

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._lock:
            return [(e := self._entries.get(k)) is not None and e.ready for k in keys]

    def touch(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None and entry.ready and not entry.pinned:
                    self.policy.touch(key)

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        removed: list[ChunkKey] = []
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is None or not entry.ready or entry.refs > 0:
                    continue
                self._drop_locked(key)
                removed.append(key)
        self._emit("evict", removed)
        return len(removed)

    def pin(self, keys: Sequence[ChunkKey]) -> int:
        count = 0
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None and entry.ready:
                    if not entry.pinned:
                        entry.pinned = True
                        self.policy.remove(key)
                    count += 1
        return count

    def unpin(self, keys: Sequence[ChunkKey]) -> int:
        count = 0
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None and entry.pinned:
                    entry.pinned = False
                    self.policy.insert(key, entry.size, entry.parent)
                    count += 1
        return count

    def is_pinned(self, key: ChunkKey) -> bool:
        with self._lock:
            entry = self._entries.get(key)
            return entry is not None and entry.pinned

    def usage(self) -> TierUsage:
        with self._lock:
            return TierUsage(self._used, self.budget, len(self._entries))

    def iter_keys(self) -> Iterator[ChunkKey]:
        with self._lock:
            keys = [k for k, e in self._entries.items() if e.ready]
        return iter(keys)

    # -- internals -----------------------------------------------------------------------------

    def _drop_locked(self, key: ChunkKey) -> None:
        entry = self._entries.pop(key)
        self._used -= entry.size
        self.policy.remove(key)
        self.evictions += 1
        self._give_back(entry)

    def _give_back(self, entry: _Entry) -> None:
        """An entry left the tier (no reader holds it): its buffer goes back to ``free``."""
        if self._free is not None and entry.buf is not None:
            buf, entry.buf = entry.buf, None
            self._free(buf)


def make_cpu_tier(context: TierContext) -> CpuTier:
    return CpuTier(context.settings.cpu_size, context.make_policy(), context.notify)


@hookimpl
def kvcore_register_tiers(register: Callable[..., None]) -> None:
    register("cpu", make_cpu_tier)
