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

import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

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
    def unpack(cls, raw: bytes) -> "Entry":
        size, seq, flags = _ENTRY.unpack_from(raw)
        return cls(size, seq, flags, bytes(raw[_ENTRY.size :]).decode())


@dataclass
class Store:
    """An open environment and its databases."""

    env: lmdb.Environment
    entries: object
    inline: object
    meta: object


def get_u64(txn: lmdb.Transaction, db: object, key: bytes) -> int:
    raw = txn.get(key, db=db)
    return _U64.unpack(raw)[0] if raw is not None else 0


def put_u64(txn: lmdb.Transaction, db: object, key: bytes, value: int) -> None:
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
        os.makedirs(real, exist_ok=True)
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
        env.reader_check()  # free reader slots of processes that died
        store = Store(
            env,
            env.open_db(b"entries"),
            env.open_db(b"inline"),
            env.open_db(b"meta"),
        )
        _open[real] = (os.getpid(), store, 1)
        return store


def close_env(directory: Path) -> None:
    """Drop one reference; the last one closes the environment."""
    real = os.path.realpath(directory)
    with _open_lock:
        held = _open.get(real)
        if held is None or held[0] != os.getpid():
            return
        if held[2] > 1:
            _open[real] = (held[0], held[1], held[2] - 1)
            return
        del _open[real]
    held[1].env.close()
