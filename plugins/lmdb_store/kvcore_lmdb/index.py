"""The shared index in LMDB: one entry per chunk, plus the store's totals.

Databases of the environment (``<path>/index/``):

- ``entries``: chunk key -> :class:`Entry` (size, last-use sequence, flags, payload file name;
  an empty name means the value sits in ``inline``);
- ``inline``: chunk key -> value, for small values;
- ``meta``: ``used`` (bytes), ``chunks``, ``seq`` (last-use clock), ``gen`` (bumped by every
  change of membership, so a process knows when others changed the store).

LMDB lets one process write at a time and any number read; a commit is atomic, so after a crash
the index is as of the last commit. An environment must be opened once per process (a second
open of the same file would drop its locks on close), hence :func:`open_env` shares one.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb

_ENTRY = struct.Struct("<QQB")
_U64 = struct.Struct("<Q")
PINNED = 1

META_USED = b"used"
META_CHUNKS = b"chunks"
META_SEQ = b"seq"
META_GEN = b"gen"


@dataclass
class Entry:
    size: int
    seq: int
    flags: int
    name: str

    @property
    def pinned(self) -> bool:
        return bool(self.flags & PINNED)

    def pack(self) -> bytes:
        return _ENTRY.pack(self.size, self.seq, self.flags) + self.name.encode()

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> Entry:
        size, seq, flags = _ENTRY.unpack_from(raw)
        return cls(size, seq, flags, bytes(raw[_ENTRY.size :]).decode())


FILES = ("data.mdb", "lock.mdb")


def file_ids(directory: Path | str) -> tuple[tuple[int, int] | None, ...]:
    """(device, inode) of the environment's files, ``None`` for one that is missing."""
    ids: list[tuple[int, int] | None] = []
    for name in FILES:
        try:
            st = os.stat(os.path.join(directory, name))
        except OSError:
            ids.append(None)
        else:
            ids.append((st.st_dev, st.st_ino))
    return tuple(ids)


@dataclass
class Store:
    """An open environment and its databases."""

    env: lmdb.Environment
    entries: Any  # lmdb's database handles (a private type of py-lmdb)
    inline: Any
    meta: Any
    ids: tuple[tuple[int, int] | None, ...] = ()
    """:func:`file_ids` when it was opened: other ids on disk mean the files were replaced."""
    dir_fd: int = -1
    """The index directory, flock()ed by every write: kvcore's writers stay one at a time even
    while lock.mdb (LMDB's own writer lock) is being removed and recreated under them."""
    closed: bool = False
    _users: int = 0
    _cond: threading.Condition = field(default_factory=threading.Condition)

    @contextmanager
    def use(self) -> Iterator[bool]:
        """Hold the environment open for a few LMDB calls; yields False once it is closed."""
        with self._cond:
            if self.closed:
                ok = False
            else:
                self._users += 1
                ok = True
        try:
            yield ok
        finally:
            if ok:
                with self._cond:
                    self._users -= 1
                    if not self._users:
                        self._cond.notify_all()

    @contextmanager
    def write_lock(self) -> Iterator[None]:
        """Exclusive across processes (the same lock in every process that opened the store)."""
        if self.dir_fd < 0:
            yield
            return
        fcntl.flock(self.dir_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.dir_fd, fcntl.LOCK_UN)

    def close_when_idle(self, wait_s: float) -> bool:
        """Close the environment once no thread uses it (waiting up to ``wait_s``)."""
        with self._cond:
            if self.closed:
                return True
            if not self._cond.wait_for(lambda: self._users == 0, wait_s):
                return False
            self.closed = True
        self.env.close()
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1
        return True

    def files_changed(self, directory: Path | str) -> list[str]:
        """Names of the environment's files that were removed or replaced since it opened."""
        now = file_ids(directory)
        return [name for name, was, is_ in zip(FILES, self.ids, now) if was != is_]


def get_u64(txn: lmdb.Transaction, db: Any, key: bytes) -> int:
    raw = txn.get(key, db=db)
    return _U64.unpack(raw)[0] if raw is not None else 0


def put_u64(txn: lmdb.Transaction, db: Any, key: bytes, value: int) -> None:
    txn.put(key, _U64.pack(max(0, value)), db=db)


_open: dict[str, tuple[int, Store, int]] = {}
_open_lock = threading.Lock()


def open_env(directory: Path, map_size: int, durable: bool) -> Store:
    """The process's environment at ``directory`` (opened on first use, then shared).

    Every commit is synced, so a power loss never corrupts the index. Unless ``durable``, the
    meta page is not synced separately (LMDB's ``metasync=False``): one flush per commit instead
    of two, and a power loss may undo the last commit, which a cache can afford.
    """
    real = os.path.realpath(directory)
    with _open_lock:
        held = _open.get(real)
        if held is not None and held[0] == os.getpid():
            _open[real] = (held[0], held[1], held[2] + 1)
            return held[1]
        return _open_new(real, map_size, durable, 1)


def reopen_env(directory: Path, stale: Store, map_size: int, durable: bool,
               wait_s: float = 5.0) -> Store:
    """The environment at ``directory`` opened afresh after ``stale``'s files were removed or
    replaced (another holder in this process may have done so already: then its store).

    The stale environment is closed first, once no thread is inside it: LMDB must not have two
    environments on one lock file in a process (py-lmdb refuses it).
    """
    real = os.path.realpath(directory)
    with _open_lock:
        held = _open.get(real)
        if held is not None and held[0] == os.getpid():
            current = held[1]
            if current is not stale and not current.closed and not current.files_changed(real):
                _open[real] = (held[0], current, held[2] + 1)
                return current
            del _open[real]
            if current is not stale and not current.close_when_idle(wait_s):
                raise lmdb.Error(f"the environment at {real} is still in use")
        if not stale.close_when_idle(wait_s):
            raise lmdb.Error(f"the environment at {real} is still in use")
        return _open_new(real, map_size, durable, 1)


def _open_new(real: str, map_size: int, durable: bool, refs: int) -> Store:
    os.makedirs(real, exist_ok=True)
    dir_fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        # Opening the named databases commits a write transaction: under the writers' lock.
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        try:
            env = lmdb.open(
                real,
                map_size=map_size,
                max_dbs=4,
                max_readers=1024,
                sync=True,
                metasync=durable,
                readahead=False,
                lock=True,
            )
            try:
                env.reader_check()  # free reader slots of processes that died
                store = Store(
                    env,
                    env.open_db(b"entries"),
                    env.open_db(b"inline"),
                    env.open_db(b"meta"),
                    file_ids(real),
                    dir_fd,
                )
            except BaseException:
                env.close()
                raise
        finally:
            fcntl.flock(dir_fd, fcntl.LOCK_UN)
    except BaseException:
        os.close(dir_fd)
        raise
    _open[real] = (os.getpid(), store, refs)
    return store


def close_env(directory: Path, store: Store | None = None) -> None:
    """Drop one reference (to ``store``, when given); the last one closes the environment.

    A store that is no longer the process's one (its files were replaced) was closed already.
    """
    real = os.path.realpath(directory)
    with _open_lock:
        held = _open.get(real)
        if held is None or held[0] != os.getpid():
            return
        if store is not None and held[1] is not store:
            return
        if held[2] > 1:
            _open[real] = (held[0], held[1], held[2] - 1)
            return
        del _open[real]
    held[1].close_when_idle(5.0)
