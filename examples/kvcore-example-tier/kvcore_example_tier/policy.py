"""The ``example_fifo`` eviction policy: first in, first out (a hit does not extend a chunk's
life). Select it with ``KVCORE_EVICTION=example_fifo``; every tier then uses it."""

from __future__ import annotations

from collections.abc import Container

from kvcore.interfaces import EvictionPolicy
from kvcore.keys import ChunkKey


class FifoPolicy(EvictionPolicy):
    """Evicts in the order chunks were stored. Called under the tier's lock: no lock here."""

    name = "example_fifo"

    def __init__(self) -> None:
        self._order: dict[ChunkKey, None] = {}  # dicts keep insertion order

    def insert(self, key: ChunkKey, size: int, parent: ChunkKey | None) -> None:
        self._order.setdefault(key, None)

    def touch(self, key: ChunkKey) -> None:
        """A hit changes nothing: that is what makes it FIFO rather than LRU."""

    def remove(self, key: ChunkKey) -> None:
        self._order.pop(key, None)

    def victim(self, exclude: Container[ChunkKey] = ()) -> ChunkKey | None:
        return next((key for key in self._order if key not in exclude), None)

    def __len__(self) -> int:
        return len(self._order)
