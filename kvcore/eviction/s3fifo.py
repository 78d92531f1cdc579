"""S3-FIFO (Yang et al., SOSP 2023): a small probationary FIFO, a main FIFO and a ghost FIFO.

New chunks enter the small queue. When room is needed and the small queue holds at least
``small_share`` of the tier's bytes, its oldest chunk leaves: to the main queue if it was hit
since it came in, else out of the tier (its key kept in the ghost queue). Otherwise the main
queue's oldest chunk leaves, unless it was hit, in which case it goes round again with one hit
less (hits count up to ``max_freq``). A chunk stored again while its key is a ghost goes
straight to the main queue. One-off chunks thus leave early, and a chunk reused once survives.

The tier asks for a victim, then removes it: :meth:`S3FIFOPolicy.victim` does the moves and
names the chunk, :meth:`~S3FIFOPolicy.remove` ghosts it if it came from the small queue.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container

from kvcore.eviction.queues import first_not_in as _first
from kvcore.interfaces import EvictionPolicy
from kvcore.keys import ChunkKey


class S3FIFOPolicy(EvictionPolicy):
    """Small, main and ghost FIFOs over ordered dicts (oldest first); sizes in bytes."""

    name = "s3fifo"

    def __init__(self, small_share: float = 0.1, max_freq: int = 3) -> None:
        if not 0 < small_share < 1 or max_freq < 1:
            raise ValueError("small_share must lie in (0, 1) and max_freq be at least 1")
        self.small_share = small_share
        self.max_freq = max_freq
        self._small: OrderedDict[ChunkKey, None] = OrderedDict()
        self._main: OrderedDict[ChunkKey, None] = OrderedDict()
        self._ghost: OrderedDict[ChunkKey, None] = OrderedDict()
        self._freq: dict[ChunkKey, int] = {}
        self._size: dict[ChunkKey, int] = {}
        self._small_bytes = 0
        self._main_bytes = 0
        self._proposed: ChunkKey | None = None
        """The last victim named from the small queue (ghosted when the tier removes it)."""

    def insert(self, key: ChunkKey, size: int, parent: ChunkKey | None) -> None:
        self._forget(key)
        self._freq[key] = 0
        self._size[key] = size
        if key in self._ghost:  # evicted on probation, asked again: it is reused after all
            del self._ghost[key]
            self._main[key] = None
            self._main_bytes += size
        else:
            self._small[key] = None
            self._small_bytes += size

    def touch(self, key: ChunkKey) -> None:
        freq = self._freq.get(key)
        if freq is not None and freq < self.max_freq:
            self._freq[key] = freq + 1

    def remove(self, key: ChunkKey) -> None:
        was_small = key in self._small
        if not self._forget(key):
            return
        if was_small and key == self._proposed:
            self._ghost[key] = None
            bound = max(1, len(self._freq))
            while len(self._ghost) > bound:
                self._ghost.popitem(last=False)
        self._proposed = None

    def victim(self, exclude: Container[ChunkKey] = ()) -> ChunkKey | None:
        # each pass moves a chunk from small to main or takes one hit off a main chunk, so
        # the loop ends within (max_freq + 1) passes per chunk
        for _ in range((self.max_freq + 1) * len(self._freq) + 1):
            total = self._small_bytes + self._main_bytes
            from_main = _first(self._main, exclude)
            from_small = _first(self._small, exclude)
            if from_small is not None and (from_main is None
                                           or self._small_bytes >= self.small_share * total):
                if self._freq[from_small] > 0:  # hit while on probation: promote
                    self._promote(from_small)
                    continue
                self._proposed = from_small
                return from_small
            if from_main is None:
                return None
            if self._freq[from_main] > 0:  # hit since its last round: once more
                self._freq[from_main] -= 1
                self._main.move_to_end(from_main)
                continue
            self._proposed = None
            return from_main
        return _first(self._main, exclude) or _first(self._small, exclude)

    def __len__(self) -> int:
        return len(self._freq)

    def _promote(self, key: ChunkKey) -> None:
        del self._small[key]
        size = self._size[key]
        self._small_bytes -= size
        self._main[key] = None
        self._main_bytes += size
        self._freq[key] = 0

    def _forget(self, key: ChunkKey) -> bool:
        """Drop ``key`` from the resident queues; whether it was there."""
        if self._freq.pop(key, None) is None:
            return False
        size = self._size.pop(key)
        if key in self._small:
            del self._small[key]
            self._small_bytes -= size
        else:
            del self._main[key]
            self._main_bytes -= size
        return True
