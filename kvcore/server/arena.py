"""A shared-memory arena: one file under ``/dev/shm`` that the server and its engines map, cut
into chunk buffers by a first-fit allocator.

Only the server allocates; engines map the same file and address buffers by offset. The file is
created with mode 0600 (or 0660 with a group), so only the server's user (or group) can map it.
"""

from __future__ import annotations

import bisect
import fcntl
import mmap
import os
import stat
import threading
from pathlib import Path

import numpy as np

ALIGN = 4096
"""Every buffer starts on a page: copies into it run at full speed, and offsets stay small."""


def _round_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class ArenaFull(MemoryError):
    """No free extent is large enough (the tier's byte budget is checked before this)."""


class SharedArena:
    """``size`` bytes of shared memory at ``path``, mapped read-write.

    ``create=True`` makes the file (it must not exist) and sizes it; otherwise an existing one
    is mapped, and its size is taken from the file (bounded by ``max_size``). ``lock=True``
    holds an exclusive ``flock`` on the file until :meth:`close`: the mark of a live server
    (one that died released it, so its file can be removed).
    """

    def __init__(self, path: str | Path, size: int = 0, create: bool = False,
                 group: int | None = None, max_size: int = 1 << 44,
                 expect_group: int | None = None, lock: bool = False) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None
        if create:
            size = _round_up(size)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                if lock:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if group is not None:
                    os.fchown(fd, -1, group)
                    os.fchmod(fd, 0o660)
                os.ftruncate(fd, size)
                # Claim the pages now: a budget larger than the file system (a small
                # /dev/shm) fails here with a clear error, not later with SIGBUS in an engine.
                os.posix_fallocate(fd, 0, size)
            except BaseException:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise
        else:
            # The path came over a socket: a regular file (no symlink) of our user, or of the
            # group we share with the server, and nothing else.
            fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW)
            info = os.fstat(fd)
            size = info.st_size
            owner_ok = (info.st_uid == os.geteuid() if expect_group is None
                        else info.st_gid == expect_group)
            if not (stat.S_ISREG(info.st_mode) and owner_ok and 0 < size <= max_size):
                os.close(fd)
                raise ValueError(f"{self.path} is not a kvcore arena (a regular file of this "
                                 "user, or of KVCORE_SERVER_GROUP)")
        try:
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        if lock:
            self._lock_fd = fd
        else:
            os.close(fd)
        self.size = size
        self.array = np.frombuffer(self._map, dtype=np.uint8)
        self.base = self.array.ctypes.data
        self._free: list[tuple[int, int]] = [(0, size)]
        """Free extents (offset, length), sorted by offset, never adjacent."""
        self._lock = threading.Lock()

    # -- allocation (the server's side) ---------------------------------------------------------

    def allocate(self, nbytes: int) -> np.ndarray:
        """A buffer of ``nbytes`` inside the arena (first fit); :class:`ArenaFull` if none."""
        need = _round_up(max(1, nbytes))
        with self._lock:
            for i, (offset, length) in enumerate(self._free):
                if length >= need:
                    if length == need:
                        del self._free[i]
                    else:
                        self._free[i] = (offset + need, length - need)
                    break
            else:
                raise ArenaFull(f"no free extent of {need} bytes in the {self.size}-byte arena")
        return self.array[offset : offset + nbytes]

    def free(self, buf: np.ndarray) -> None:
        """Give back a buffer :meth:`allocate` returned (merged with free neighbours)."""
        offset = self.offset_of(buf)
        length = _round_up(max(1, buf.nbytes))
        with self._lock:
            i = bisect.bisect_left(self._free, (offset, 0))
            if i > 0 and sum(self._free[i - 1]) == offset:
                i -= 1
                offset, length = self._free[i][0], self._free[i][1] + length
                del self._free[i]
            if i < len(self._free) and offset + length == self._free[i][0]:
                length += self._free[i][1]
                del self._free[i]
            self._free.insert(i, (offset, length))

    def free_bytes(self) -> int:
        with self._lock:
            return sum(length for _, length in self._free)

    # -- addressing (both sides) ---------------------------------------------------------------

    def offset_of(self, buf: np.ndarray) -> int:
        offset = buf.ctypes.data - self.base
        if not 0 <= offset <= self.size - buf.nbytes:
            raise ValueError("buffer is not inside this arena")
        return int(offset)

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        """The arena's bytes ``[offset, offset + nbytes)``; a ValueError when out of range (an
        offset came from another process)."""
        if not (0 <= offset and 0 <= nbytes and offset + nbytes <= self.size):
            raise ValueError(f"extent {offset}+{nbytes} is outside the {self.size}-byte arena")
        return self.array[offset : offset + nbytes]

    def close(self, unlink: bool = False) -> None:
        """Unmap when no view is left (views keep the mapping alive otherwise); ``unlink``
        removes the file (the server, at exit)."""
        self.array = np.empty(0, dtype=np.uint8)
        try:
            self._map.close()
        except BufferError:
            pass  # views still exported: the mapping goes with the last of them
        if unlink:
            self.path.unlink(missing_ok=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
