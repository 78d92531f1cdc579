"""Payload files: one file per chunk, written once, never modified, removed on eviction.

A file is named ``chunks/<xx>/<key hex>.<pid>.<token>`` (``xx`` = first hash byte), unique per
write, so a rewrite never touches bytes a reader may be reading, and a crashed writer leaves at
worst an unindexed file, which :func:`collect_orphans` removes.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from kvcore.interfaces import Buffer
from kvcore.keys import NAMESPACE_BYTES, ChunkKey
from kvcore.processes import pid_alive

ORPHAN_AGE_S = 3600.0
"""An unindexed file of a live writer is left alone for this long (it may be about to commit)."""


def new_name(key: ChunkKey) -> str:
    """A fresh, unique file name for one write of ``key``."""
    return f"{key.hex()}.{os.getpid()}.{secrets.token_hex(6)}"


def file_path(root: Path, name: str) -> Path:
    return root / name[2 * NAMESPACE_BYTES : 2 * NAMESPACE_BYTES + 2] / name


def write(root: Path, name: str, parts: Sequence[Buffer], fsync: bool) -> int:
    """Write ``parts`` into a new file; return its size. On any error the file is removed."""
    path = file_path(root, name)
    views = [memoryview(p).cast("B") for p in parts]
    total = sum(v.nbytes for v in views)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        done = 0
        while done < total:
            done += _pwritev_from(fd, views, done)
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        remove(root, name)
        raise
    os.close(fd)
    return total


def _pwritev_from(fd: int, views: list[memoryview], offset: int) -> int:
    """One ``pwritev`` of the bytes of ``views`` from ``offset`` on (handles short writes)."""
    rest: list[memoryview] = []
    skip = offset
    for view in views:
        if skip >= view.nbytes:
            skip -= view.nbytes
            continue
        rest.append(view[skip:])
        skip = 0
    written = os.pwritev(fd, rest[: os.sysconf("SC_IOV_MAX")], offset)
    if written <= 0:
        raise OSError("pwritev wrote nothing")
    return written


def sync(root: Path, names: Sequence[str]) -> None:
    """fsync the files, several at once so the disk sees them together (like one big file)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(name: str) -> None:
        fd = os.open(file_path(root, name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    if len(names) == 1:
        one(names[0])
        return
    with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
        list(pool.map(one, names))


def read(root: Path, name: str, size: int) -> bytes | None:
    """The file's bytes if it can be read and holds exactly ``size`` bytes, else ``None``.

    Any error (missing file, I/O error on a bad sector) is ``None``: a miss, never an exception.
    """
    try:
        fd = os.open(file_path(root, name), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_size != size:
            return None
        data = os.pread(fd, size, 0)
        while len(data) < size:  # short reads are rare; never return a partial value
            more = os.pread(fd, size - len(data), len(data))
            if not more:
                return None
            data += more
        return data
    except OSError:
        return None
    finally:
        os.close(fd)


def remove(root: Path, name: str) -> None:
    try:
        os.unlink(file_path(root, name))
    except FileNotFoundError:
        pass


def iter_files(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every payload file under ``root`` as (name, stat)."""
    if not root.is_dir():
        return
    for sub in os.scandir(root):
        if not sub.is_dir():
            continue
        for entry in os.scandir(sub.path):
            try:
                yield entry.name, entry.stat()
            except FileNotFoundError:
                continue


def collect_orphans(
    root: Path, indexed: Callable[[str], bool], age_s: float = ORPHAN_AGE_S
) -> int:
    """Remove files no index entry points at, whose writer is gone or that are old; count them."""
    now = time.time()
    removed = 0
    for name, st in list(iter_files(root)):
        parts = name.split(".")
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        if indexed(name):
            continue
        pid = int(parts[1])
        if pid != os.getpid() and pid_alive(pid) and now - st.st_mtime < age_s:
            continue
        if pid == os.getpid() and now - st.st_mtime < age_s:
            continue
        remove(root, name)
        removed += 1
    return removed
