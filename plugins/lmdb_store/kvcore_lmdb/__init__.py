"""kvcore-lmdb: a persistent, crash-safe local disk tier shared by the processes of one host.

The index (which chunk, how big, where, how recently used, pinned) and the store's totals live in
LMDB; payloads above a few KiB live in one file per chunk written with ``pwritev`` outside the
B-tree. See ``docs/lmdb.md``.
"""

from kvcore_lmdb.settings import LmdbSettings
from kvcore_lmdb.tier import LmdbTier

__all__ = ["LmdbSettings", "LmdbTier"]
