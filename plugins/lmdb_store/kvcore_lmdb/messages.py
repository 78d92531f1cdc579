"""Sizing of the LMDB map, and the messages a user reads when the disk tier cannot work."""

from __future__ import annotations

import errno
from pathlib import Path

import lmdb


def map_size_for(budget: int) -> int:
    """LMDB map size: room for a store of only inline values; it costs address space only.

    A power of two, so processes with similar budgets open the map with the same size.
    """
    return max(256 * 1024**3, 1 << (2 * budget - 1).bit_length())


def explain(exc: BaseException, root: Path, budget: int) -> str:
    """A message a user can act on, naming the setting involved."""
    where = f"KVCORE_LMDB_PATH={str(root)!r}"
    tail = "; the disk tier is skipped and the engine keeps serving from the tiers above"
    code = getattr(exc, "errno", None)
    text = str(exc)
    if isinstance(exc, lmdb.MapFullError):
        return (f"the LMDB index under {where} is full (map size {map_size_for(budget)} bytes); "
                f"lower KVCORE_LMDB_INLINE_MAX or raise KVCORE_LMDB_SIZE{tail}")
    if code == errno.ENOSPC or "No space left" in text:
        return (f"the disk under {where} is full; set KVCORE_LMDB_SIZE (now {budget} bytes) "
                f"below the free space or free some{tail}")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS) or "Permission denied" in text \
            or "Read-only" in text:
        return f"{where} is not writable ({text}); point it at a writable directory{tail}"
    if isinstance(exc, ValueError):
        return f"{text} under {where}"
    return f"cannot use the store at {where}: {type(exc).__name__}: {text}{tail}"
