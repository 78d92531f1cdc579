"""The disk tier: an LMDB index of chunks whose payloads live in per-chunk files.

Write path (one :meth:`LmdbTier.put` call): each new value is written into a fresh file
(``pwritev`` of the frame header and payload, no concatenation) or kept for LMDB when small; then
one LMDB write transaction makes room (evicting by the configured policy, budget and totals read
from the shared index) and indexes the values; only after the commit are evicted files unlinked.
A writer killed at any moment leaves the index as of its last commit: never an entry that points
at a partly written file. Unindexed files are collected when a store is opened.

Read path: one read transaction finds the entries, then each file is read with one ``pread``; a file
that is missing, of the wrong size or whose frame header names another key is a miss and its entry
is removed. The checksum of the frame is verified by the engine.

Several processes share one store: LMDB serialises writers and lets readers run alongside. Each
process keeps its own policy object, rebuilt from the index (ordered by the shared last-use clock)
whenever another process changed the store since this one last looked.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import lmdb

from kvcore import chunk_format
from kvcore.failures import FailureLog
from kvcore.interfaces import Buffer, EvictionPolicy, Tier, TierUsage
from kvcore.keys import ChunkKey
from kvcore_lmdb import files, index
from kvcore_lmdb.index import META_CHUNKS, META_GEN, META_SEQ, META_USED, Entry, get_u64, put_u64
from kvcore_lmdb.messages import explain, map_size_for
from kvcore_lmdb.settings import LmdbSettings

log = logging.getLogger("kvcore.lmdb")

_FRAME = struct.Struct("<4sHH24sIIQ")
TOUCH_FLUSH_S = 1.0
"""Hits are written to the shared last-use clock at most this often (one small transaction)."""


class LmdbTier(Tier):
    """Chunks on local disk, shared by every process that opens the same directory."""

    name = "lmdb"
    framed = True

    def __init__(
        self,
        settings: LmdbSettings,
        make_policy: Callable[[], EvictionPolicy],
        notify: Callable[[str, str, list[ChunkKey]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.codec = settings.codec
        self.root = Path(settings.path).expanduser()
        self.chunks_dir = self.root / "chunks"
        self.budget = settings.size
        self._make_policy = make_policy
        self._notify = notify
        self.policy = make_policy()
        self._lock = threading.RLock()
        self._store: index.Store | None = None
        self._pid = 0
        self._next_try = 0.0
        self._known_gen = -1
        self._touched: dict[ChunkKey, None] = {}
        self._touched_at = time.monotonic()
        self._flushing = False
        self.failures = FailureLog(log, "the chunk is a miss (memory still serves)",
                                   prefix="kvcore-lmdb ")
        """Disk errors: each kind logged once with what to change (:func:`explain`)."""
        self._checked_at = time.monotonic()
        self.stats = {"corrupt": 0, "evicted": 0, "errors": 0, "orphans_removed": 0,
                      "reopened": 0, "recovered": 0}
        self._available()

    # -- opening -------------------------------------------------------------------------------

    def _available(self, check: bool = False) -> index.Store | None:
        """The open store, opening it if needed (retried every ``retry_s`` after a failure).

        Every ``check_s`` (and always with ``check``) it first makes sure the index files are
        still the ones it opened (see :meth:`_check_files`).
        """
        store = self._store
        if store is not None and self._pid == os.getpid():
            if check or store.closed or \
                    time.monotonic() - self._checked_at >= self.settings.check_s:
                self._check_files(store)
                store = self._store
            if store is not None:
                return store
        with self._lock:
            if self._store is not None and self._pid == os.getpid():
                return self._store
            self._store = None
            now = time.monotonic()
            if now < self._next_try:
                return None
            self._next_try = now + self.settings.retry_s
            try:
                self.chunks_dir.mkdir(parents=True, exist_ok=True)
                map_size = map_size_for(self.budget)
                store = index.open_env(self.root / "index", map_size, self.settings.fsync)
            except (OSError, lmdb.Error) as exc:
                self._report("open", exc)
                return None
            self._store, self._pid, self._known_gen = store, os.getpid(), -1
            self._checked_at = time.monotonic()
        self.collect_orphans()
        return self._store

    @contextmanager
    def _use(self, check: bool = False) -> Iterator[index.Store | None]:
        """The open store, held open for the LMDB calls of the block (None: unavailable)."""
        for _ in range(2):
            store = self._available(check)
            if store is None:
                break
            with store.use() as ok:
                if ok:
                    yield store
                    return
            check = True  # closed meanwhile (reopened by another thread): take the new one
        yield None

    # -- files pulled away ---------------------------------------------------------------------

    def _check_files(self, store: index.Store) -> None:
        """Reopen the store if its data.mdb or lock.mdb was removed or replaced.

        Without this a process keeps writing into a deleted data.mdb (every chunk it stores is
        lost when it exits), or, with lock.mdb gone, a process opening the store afresh takes a
        second writer lock and two writers corrupt the B-tree (LMDB then aborts the process).
        A removed data.mdb is restored first from this process's still-open copy of it.
        """
        self._checked_at = time.monotonic()
        directory = self.root / "index"
        changed = store.files_changed(directory)
        if not changed and not store.closed:
            return
        if not changed:  # another tier of this process reopened the shared environment
            with self._lock:
                if self._store is store:
                    try:
                        self._store = index.reopen_env(directory, store,
                                                       map_size_for(self.budget),
                                                       self.settings.fsync)
                    except (OSError, lmdb.Error) as exc:
                        self._store = None
                        self._report("reopen", exc)
                    self._known_gen = -1
            return
        with self._lock:
            if self._store is not store:
                return  # another thread reopened it already
            recovered = self._restore(store, directory) if "data.mdb" in changed else None
            try:
                fresh = index.reopen_env(directory, store, map_size_for(self.budget),
                                         self.settings.fsync)
            except (OSError, lmdb.Error) as exc:
                self._store = None
                self._next_try = time.monotonic() + self.settings.retry_s
                self._report("reopen", exc)
                return
            self._store, self._known_gen = fresh, -1
            self.stats["reopened"] += 1
        if recovered is not None:
            self.stats["recovered"] += recovered
            what = f"restored {recovered} indexed chunk(s) from the copy this process had open"
        elif "data.mdb" in changed:
            what = ("another process recreated it first: chunks indexed only in the old file "
                    "are lost (their payload files are collected as orphans)")
        else:
            what = "no chunk lost"
        log.warning("kvcore-lmdb: %s under KVCORE_LMDB_PATH=%r was removed or replaced while "
                    "open; reopened the store (%s)", " and ".join(changed), str(self.root), what)

    def _restore(self, store: index.Store, directory: Path) -> int | None:
        """Copy the open (deleted) data.mdb back into place; the chunks restored, or None."""
        if os.path.exists(directory / "data.mdb"):
            return None  # replaced by another file: that one is the store now
        tmp = directory.parent / f".index-restore-{os.getpid()}-{threading.get_ident()}"
        try:
            os.makedirs(directory, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            with store.use() as ok:
                if not ok:
                    return None
                store.env.copy(str(tmp))
                with store.env.begin(db=store.entries) as txn:
                    count = txn.stat(store.entries)["entries"]
            os.link(tmp / "data.mdb", directory / "data.mdb")  # fails if another process won
            return int(count)
        except (OSError, lmdb.Error) as exc:
            self._report("restore", exc)
            return None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def collect_orphans(self, age_s: float = files.ORPHAN_AGE_S) -> int:
        """Remove payload files that no index entry points at (left by crashed writers)."""
        store = self._store
        if store is None:
            return 0

        def indexed(name: str) -> bool:
            key = bytes.fromhex(name.split(".")[0])
            with store.use() as ok:
                if not ok:
                    raise lmdb.Error("the store was reopened")
                with store.env.begin(db=store.entries) as txn:
                    raw = txn.get(key)
            return raw is not None and Entry.unpack(raw).name == name

        try:
            removed = files.collect_orphans(self.chunks_dir, indexed, age_s)
        except (OSError, ValueError, lmdb.Error) as exc:
            self._report("collect", exc)
            return 0
        self.stats["orphans_removed"] += removed
        return removed

    # -- reading -------------------------------------------------------------------------------

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._use() as store:
            if store is None:
                return [False] * len(keys)
            with store.env.begin(db=store.entries) as txn:
                return [txn.get(key) is not None for key in keys]

    def get(self, keys: Sequence[ChunkKey]) -> list[Buffer | None]:
        out: list[Buffer | None] = [None] * len(keys)
        found: dict[int, Entry] = {}
        with self._use() as store:
            if store is None:
                return out
            with store.env.begin() as txn:
                for i, key in enumerate(keys):
                    raw = txn.get(key, db=store.entries)
                    if raw is None:
                        continue
                    found[i] = entry = Entry.unpack(raw)
                    if not entry.name:
                        value = txn.get(key, db=store.inline)
                        out[i] = bytes(value) if value is not None else None
        for i, entry in found.items():
            if entry.name:
                out[i] = files.read(self.chunks_dir, entry.name, entry.size)
        bad: list[tuple[ChunkKey, str | None]] = []
        for i, entry in found.items():
            read = out[i]
            if read is None or len(read) != entry.size or not _frame_matches(keys[i], read):
                bad.append((keys[i], entry.name))
                out[i] = None
        if bad:
            with self._use() as store:  # evicted meanwhile by another process: a miss
                bad = self._still_indexed(store, bad) if store is not None else []
        if bad:
            self.stats["corrupt"] += len(bad)
            self._report("read", ValueError(
                f"{len(bad)} missing, truncated or foreign chunk(s) read as misses and removed"))
            self._drop_exact(bad)
            self._emit("corrupt", [key for key, _ in bad])
        hits = [key for key, value in zip(keys, out) if value is not None]
        if hits:
            self._touch(hits)
        return out

    @staticmethod
    def _still_indexed(
        store: index.Store, found: list[tuple[ChunkKey, str | None]]
    ) -> list[tuple[ChunkKey, str | None]]:
        """The (key, file) pairs whose entry still names that same file."""
        with store.env.begin(db=store.entries) as txn:
            return [(key, name) for key, name in found
                    if (raw := txn.get(key)) is not None and Entry.unpack(raw).name == name]

    def _touch(self, keys: list[ChunkKey]) -> None:
        """Record hits; write them to the shared clock in the background (reads never wait on
        a commit's fsync)."""
        with self._lock:
            for key in keys:
                self.policy.touch(key)
                self._touched[key] = None
            due = time.monotonic() - self._touched_at >= TOUCH_FLUSH_S
            if due and not self._flushing:
                self._flushing = True
                self._touched_at = time.monotonic()
                threading.Thread(target=self._flush_in_background, name="kvcore-lmdb-touch",
                                 daemon=True).start()

    def _flush_in_background(self) -> None:
        try:
            self.flush_hits()
        finally:
            self._flushing = False

    def flush_hits(self) -> bool:
        """Write this process's recent hits to the shared last-use clock now."""
        return self._write(lambda txn, state: None)

    # -- writing -------------------------------------------------------------------------------

    def put(self, items: Sequence[tuple[ChunkKey, Sequence[Buffer]]]) -> list[bool]:
        store = self._available()
        if store is None:
            return [False] * len(items)
        result = [False] * len(items)
        present = self.contains([key for key, _ in items])
        staged: list[tuple[int, ChunkKey, int, str, bytes | None]] = []
        for i, (key, parts) in enumerate(items):
            if present[i]:
                result[i] = True
                continue
            size = sum(memoryview(p).nbytes for p in parts)
            if size > self.budget:
                continue
            try:
                if size <= self.settings.inline_max:
                    staged.append((i, key, size, "", b"".join(bytes(p) for p in parts)))
                else:
                    name = files.new_name(key)
                    files.write(self.chunks_dir, name, parts, fsync=False)
                    staged.append((i, key, size, name, None))
            except OSError as exc:
                self._report("write", exc)
        if not staged:
            return result
        if self.settings.fsync:
            try:
                files.sync(self.chunks_dir, [name for _, _, _, name, _ in staged if name])
            except OSError as exc:
                self._report("write", exc)
                for _, _, _, name, _ in staged:
                    if name:
                        files.remove(self.chunks_dir, name)
                failed = {i for i, *_ in staged}
                return [False if i in failed else r for i, r in enumerate(result)]
        admitted: list[ChunkKey] = []

        def index_them(txn: lmdb.Transaction, state: dict) -> None:
            store = self._store  # the one _write runs in (reopened if its files were replaced)
            assert store is not None
            batch = {key for _, key, _, _, _ in staged}
            for i, key, size, name, value in staged:
                if txn.get(key, db=store.entries) is not None:  # another process was faster
                    state["unlink"].append(name)
                    result[i] = True
                    continue
                if not self._make_room(txn, state, size, batch):
                    state["unlink"].append(name)
                    continue
                state["seq"] += 1
                txn.put(key, Entry(size, state["seq"], 0, name).pack(), db=store.entries)
                if value is not None:
                    txn.put(key, value, db=store.inline)
                state["used"] += size
                state["chunks"] += 1
                state["changed"] = True
                admitted.append(key)
                result[i] = True

        if not self._write(index_them, on_fail=[n for _, _, _, n, _ in staged]):
            failed = {i for i, *_ in staged}
            return [False if i in failed else r for i, r in enumerate(result)]
        sizes = {key: size for _, key, size, _, _ in staged}
        with self._lock:
            for key in admitted:
                self.policy.insert(key, sizes[key], None)
        self._emit("admit", admitted)
        return result

    def _make_room(self, txn: lmdb.Transaction, state: dict, size: int, busy: set) -> bool:
        """Evict until ``size`` more bytes fit the budget; False when that is impossible."""
        store = self._store
        assert store is not None
        rebuilt = False
        if state["gen"] != self._known_gen and state["used"] + size > self.budget:
            self._rebuild(txn)
            rebuilt = True
        while state["used"] + size > self.budget:
            victim = self.policy.victim(busy)
            if victim is None:
                if rebuilt:
                    return False
                self._rebuild(txn)
                rebuilt = True
                continue
            raw = txn.get(victim, db=store.entries)
            self.policy.remove(victim)
            if raw is None:
                continue
            entry = Entry.unpack(raw)
            if entry.pinned:
                continue
            txn.delete(victim, db=store.entries)
            if not entry.name:
                txn.delete(victim, db=store.inline)
            state["used"] -= entry.size
            state["chunks"] -= 1
            state["changed"] = True
            state["unlink"].append(entry.name)
            state["evicted"].append(victim)
        return True

    def _rebuild(self, txn: lmdb.Transaction) -> None:
        """A fresh policy fed with every unpinned entry, oldest last use first."""
        store = self._store
        assert store is not None
        entries = []
        for key, raw in txn.cursor(db=store.entries):
            entry = Entry.unpack(raw)
            if not entry.pinned:
                entries.append((entry.seq, bytes(key), entry.size))
        entries.sort()
        policy = self._make_policy()
        for _, key, size in entries:
            policy.insert(key, size, None)
        self.policy = policy
        self._known_gen = get_u64(txn, store.meta, META_GEN)

    def _write(
        self,
        body: Callable[[lmdb.Transaction, dict], None],
        on_fail: Sequence[str] = (),
    ) -> bool:
        """Run ``body`` in one write transaction with the totals in ``state``; then clean up.

        Also flushes pending hits to the shared last-use clock. On failure the files named in
        ``on_fail`` are removed and the local policy is marked stale.
        """
        with self._lock:
            for _attempt in range(3):
                store = self._store
                if store is not None and self._pid == os.getpid():
                    self._check_files(store)  # never write into replaced or removed files
                    store = self._store
                if store is None:
                    return False
                state: dict = {"unlink": [], "evicted": [], "changed": False}
                stale = False
                try:
                    with store.use() as usable:
                        if not usable:
                            stale = True
                        else:
                            with store.write_lock():
                                # checked again holding the lock: a writer that opened the
                                # store afresh meanwhile is not writing now
                                stale = bool(store.files_changed(self.root / "index"))
                                if not stale:
                                    gen, new_gen, in_sync = self._commit(store, body, state)
                except (lmdb.Error, OSError) as exc:
                    self._known_gen = -1
                    for name in on_fail:
                        if name:
                            files.remove(self.chunks_dir, name)
                    self._report("index", exc)
                    return False
                if not stale:
                    break
            else:
                for name in on_fail:
                    if name:
                        files.remove(self.chunks_dir, name)
                return False
            if in_sync or self._known_gen == gen:
                self._known_gen = new_gen
            self.stats["evicted"] += len(state["evicted"])
        for name in state["unlink"]:
            if name:
                files.remove(self.chunks_dir, name)
        self._emit("evict", state["evicted"])
        return True

    def _commit(self, store: index.Store, body: Callable[[lmdb.Transaction, dict], None],
                state: dict) -> tuple[int, int, bool]:
        """One write transaction: totals into ``state``, ``body``, totals back; (gen, new gen,
        whether this process's policy was in sync)."""
        with store.env.begin(write=True) as txn:
            state["gen"] = gen = get_u64(txn, store.meta, META_GEN)
            in_sync = gen == self._known_gen
            state["used"] = get_u64(txn, store.meta, META_USED)
            state["chunks"] = get_u64(txn, store.meta, META_CHUNKS)
            state["seq"] = get_u64(txn, store.meta, META_SEQ)
            self._flush_touches(txn, state)
            body(txn, state)
            put_u64(txn, store.meta, META_USED, state["used"])
            put_u64(txn, store.meta, META_CHUNKS, state["chunks"])
            put_u64(txn, store.meta, META_SEQ, state["seq"])
            new_gen = gen + 1 if state["changed"] else gen
            put_u64(txn, store.meta, META_GEN, new_gen)
        return gen, new_gen, in_sync

    def _flush_touches(self, txn: lmdb.Transaction, state: dict) -> None:
        store = self._store
        assert store is not None
        touched, self._touched = self._touched, {}
        self._touched_at = time.monotonic()
        for key in touched:
            raw = txn.get(key, db=store.entries)
            if raw is None:
                continue
            entry = Entry.unpack(raw)
            state["seq"] += 1
            entry.seq = state["seq"]
            txn.put(key, entry.pack(), db=store.entries)
        if touched:
            state["changed"] = True  # others rebuild their order from the new clock

    # -- management ----------------------------------------------------------------------------

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        return self._drop_exact([(key, None) for key in keys])

    def _drop_exact(self, victims: Sequence[tuple[ChunkKey, str | None]]) -> int:
        """Remove entries (only where the entry still names file ``name``, when given)."""
        if self._available() is None or not victims:
            return 0
        store = self._store
        assert store is not None
        removed: list[ChunkKey] = []

        def drop(txn: lmdb.Transaction, state: dict) -> None:
            store = self._store  # the one _write runs in (reopened if its files were replaced)
            assert store is not None
            for key, name in victims:
                raw = txn.get(key, db=store.entries)
                if raw is None:
                    continue
                entry = Entry.unpack(raw)
                if name is not None and entry.name != name:
                    continue
                txn.delete(key, db=store.entries)
                if not entry.name:
                    txn.delete(key, db=store.inline)
                state["used"] -= entry.size
                state["chunks"] -= 1
                state["changed"] = True
                state["unlink"].append(entry.name)
                removed.append(key)
                self.policy.remove(key)

        self._write(drop)
        return len(removed)

    def pin(self, keys: Sequence[ChunkKey]) -> int:
        return self._set_pinned(keys, True)

    def unpin(self, keys: Sequence[ChunkKey]) -> int:
        return self._set_pinned(keys, False)

    def _set_pinned(self, keys: Sequence[ChunkKey], pinned: bool) -> int:
        if self._available() is None:
            return 0
        store = self._store
        assert store is not None
        count = [0]

        def mark(txn: lmdb.Transaction, state: dict) -> None:
            store = self._store  # the one _write runs in (reopened if its files were replaced)
            assert store is not None
            for key in keys:
                raw = txn.get(key, db=store.entries)
                if raw is None:
                    continue
                entry = Entry.unpack(raw)
                count[0] += 1
                if entry.pinned == pinned:
                    continue
                entry.flags = entry.flags | index.PINNED if pinned else entry.flags & ~index.PINNED
                txn.put(key, entry.pack(), db=store.entries)
                if pinned:
                    self.policy.remove(key)
                else:
                    self.policy.insert(key, entry.size, None)
                state["changed"] = True

        self._write(mark)
        return count[0]

    def usage(self) -> TierUsage:
        with self._use() as store:
            if store is None:
                return TierUsage(0, self.budget, 0)
            with store.env.begin(db=store.meta) as txn:
                used = get_u64(txn, store.meta, META_USED)
                chunks = get_u64(txn, store.meta, META_CHUNKS)
        return TierUsage(used, self.budget, chunks)

    def iter_keys(self) -> Iterator[ChunkKey]:
        with self._use() as store:
            if store is None:
                return iter(())
            with store.env.begin(db=store.entries) as txn:
                keys = [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]
        return iter(keys)

    def close(self) -> None:
        with self._lock:
            if self._store is not None and self._pid == os.getpid():
                if self._touched:
                    self.flush_hits()
                index.close_env(self.root / "index", self._store)
            self._store = None
            self._next_try = float("inf")

    # -- messages ------------------------------------------------------------------------------

    def _report(self, what: str, exc: BaseException) -> None:
        self.stats["errors"] += 1
        self.failures.record(what, explain(exc, self.root, self.budget))


def _frame_matches(key: ChunkKey, value: Buffer) -> bool:
    """Whether a value's frame header names ``key`` and its length (cheap; no checksum)."""
    view = memoryview(value)
    if view.nbytes < chunk_format.HEADER_BYTES:
        return False
    magic, _v, _f, stored, _t, _r, length = _FRAME.unpack_from(view)
    return (magic == chunk_format.MAGIC and stored == key
            and length + chunk_format.HEADER_BYTES == view.nbytes)
