"""Admission to the tiers below memory: which stored chunks write-behind copies down.

``all`` copies every stored chunk. ``reused`` copies a chunk only once it has been asked for a
second time: most chunks of real traffic are never asked again (one-off questions, sessions
that end), and writing them costs lower-tier bandwidth and space, and evicts chunks that would
have hit. A chunk asked for the second time is copied when it is stored again (it had left
memory) or when it hits in memory.

How often a key was asked is kept in a count-min sketch of saturating 8-bit counters (fixed
memory whatever the key count: ``4 x 2^20`` bytes by default), halved every ``10 x width``
counts so that old popularity fades, as TinyLFU does. A false positive admits a chunk early;
nothing is ever lost.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from kvcore.keys import NAMESPACE_BYTES, ChunkKey

ALL = "all"
REUSED = "reused"
MODES = (ALL, REUSED)


class AskCounter:
    """Approximate per-key ask counts (count-min sketch, ``depth`` rows of ``width`` cells)."""

    def __init__(self, width_bits: int = 20, depth: int = 4) -> None:
        if not 8 <= width_bits <= 28 or not 1 <= depth <= 8:
            raise ValueError("width_bits must lie in 8..28 and depth in 1..8")
        self.width = 1 << width_bits
        self.depth = depth
        self._mask = np.uint64(self.width - 1)
        self._cells = np.zeros((depth, self.width), dtype=np.uint8)
        self._rows = np.arange(depth, dtype=np.uint64)[:, None]
        self._counted = 0
        self._lock = threading.Lock()

    def _index(self, keys: Sequence[ChunkKey]) -> np.ndarray:
        """``depth x len(keys)`` cell indices from the keys' hash bytes (double hashing)."""
        raw = np.frombuffer(b"".join(bytes(k[NAMESPACE_BYTES:]) for k in keys), dtype="<u8")
        pairs = raw.reshape(len(keys), 2)
        h1, h2 = pairs[:, 0], pairs[:, 1] | np.uint64(1)
        with np.errstate(over="ignore"):
            return (h1[None, :] + self._rows * h2[None, :]) & self._mask

    def count(self, keys: Sequence[ChunkKey]) -> np.ndarray:
        """Estimated asks of each key (never below the true count, saturating at 255)."""
        if not keys:
            return np.zeros(0, dtype=np.uint8)
        index = self._index(keys)
        with self._lock:
            return self._cells[np.arange(self.depth)[:, None], index].min(axis=0)

    def ask(self, keys: Sequence[ChunkKey]) -> np.ndarray:
        """Count one ask of each key (distinct keys); their counts after it."""
        if not keys:
            return np.zeros(0, dtype=np.uint8)
        index = self._index(keys)
        rows = np.arange(self.depth)[:, None]
        with self._lock:
            after = self._cells[rows, index].min(axis=0).astype(np.uint16) + 1
            estimate = np.minimum(after, 255).astype(np.uint8)
            # conservative update: raise each cell to at most the new estimate of a key in it
            # (maximum.at: two keys of one batch may share a cell)
            np.maximum.at(self._cells, (np.broadcast_to(rows, index.shape), index),
                          np.broadcast_to(estimate[None, :], index.shape))
            self._counted += len(keys)
            if self._counted >= 10 * self.width:
                self._cells >>= 1
                self._counted = 0
        return estimate


class LowerAdmission:
    """Decides which chunks write-behind copies below memory (``mode``: ``all`` or
    ``reused``)."""

    def __init__(self, mode: str = ALL) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown lower-tier admission {mode!r}; known: {', '.join(MODES)}")
        self.mode = mode
        self.counter = AskCounter() if mode == REUSED else None

    def asked(self, keys: Sequence[ChunkKey], hits: int) -> list[ChunkKey]:
        """A lookup asked for ``keys``, the first ``hits`` of them cached. Returns the cached
        ones asked for exactly the second time now: to copy down (once)."""
        if self.counter is None or not keys:
            return []
        distinct = list(dict.fromkeys(keys))
        by_key = dict(zip(distinct, self.counter.ask(distinct)))
        return [k for k in keys[:hits] if by_key[k] == 2]

    def admit(self, keys: Sequence[ChunkKey]) -> list[ChunkKey]:
        """Of chunks just stored, those to copy down now."""
        if self.counter is None:
            return list(keys)
        counts = self.counter.count(keys)
        return [k for k, n in zip(keys, counts) if n >= 2]
