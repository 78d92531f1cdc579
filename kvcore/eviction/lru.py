"""Least recently used: evict the chunk whose last hit is oldest."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container

from kvcore.interfaces import EvictionPolicy
from kvcore.keys import ChunkKey


class LRUPolicy(EvictionPolicy):
    """Classic LRU over an ordered dict: O(1) insert, touch, remove and victim."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[ChunkKey, None] = OrderedDict()

    def insert(self, key: ChunkKey, size: int, parent: ChunkKey | None) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: ChunkKey) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: ChunkKey) -> None:
        self._order.pop(key, None)

    def victim(self, exclude: Container[ChunkKey] = ()) -> ChunkKey | None:
        for key in self._order:
            if key not in exclude:
                return key
        return None

    def __len__(self) -> int:
        return len(self._order)
