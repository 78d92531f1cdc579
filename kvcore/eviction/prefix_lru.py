"""Prefix-aware LRU: evict the tails of prefixes first.

A chunk is only useful while the chunk before it is cached, so evicting a chunk in the middle of a
prefix wastes every chunk after it. This policy only evicts *leaves* (chunks with no cached
child), least recently used first; a chunk whose children are all gone becomes a leaf again and
competes with the age of its own last hit. So a prefix's head always outlives its tail, and a
shared head (a system prompt under many conversations) stays while any conversation does.

Leaves sit in a heap keyed by last-hit tick, with stale entries dropped lazily: O(log n) per
operation, whatever the size of the index.
"""

from __future__ import annotations

import heapq
from collections.abc import Container

from kvcore.interfaces import EvictionPolicy
from kvcore.keys import ChunkKey


class PrefixLRUPolicy(EvictionPolicy):
    """LRU among leaves of the prefix forest; inner chunks wait until their children are gone."""

    name = "prefix_lru"

    def __init__(self) -> None:
        self._tick = 0
        self._last: dict[ChunkKey, int] = {}
        self._parent: dict[ChunkKey, ChunkKey | None] = {}
        self._children: dict[ChunkKey, int] = {}
        self._heap: list[tuple[int, ChunkKey]] = []

    def _stamp(self, key: ChunkKey) -> None:
        self._tick += 1
        self._last[key] = self._tick
        if self._children.get(key, 0) == 0:
            heapq.heappush(self._heap, (self._tick, key))
            if len(self._heap) > 4 * len(self._last) + 1024:
                self._compact()

    def _compact(self) -> None:
        self._heap = [(t, k) for t, k in self._heap if self._is_current(t, k)]
        heapq.heapify(self._heap)

    def _is_current(self, tick: int, key: ChunkKey) -> bool:
        return self._last.get(key) == tick and self._children.get(key, 0) == 0

    def insert(self, key: ChunkKey, size: int, parent: ChunkKey | None) -> None:
        if key in self._last:
            self._stamp(key)
            return
        known_parent = parent if parent in self._last else None
        self._parent[key] = known_parent
        self._children[key] = 0
        if known_parent is not None:
            self._children[known_parent] += 1
        self._stamp(key)

    def touch(self, key: ChunkKey) -> None:
        if key in self._last:
            self._stamp(key)

    def remove(self, key: ChunkKey) -> None:
        if key not in self._last:
            return
        del self._last[key]
        del self._children[key]
        parent = self._parent.pop(key)
        if parent is not None and parent in self._children:
            self._children[parent] -= 1
            if self._children[parent] == 0:
                heapq.heappush(self._heap, (self._last[parent], parent))
        # Orphaned children keep their entries; they are leaves or inner nodes as before.

    def victim(self, exclude: Container[ChunkKey] = ()) -> ChunkKey | None:
        skipped: list[tuple[int, ChunkKey]] = []
        found = None
        while self._heap:
            tick, key = self._heap[0]
            if not self._is_current(tick, key):
                heapq.heappop(self._heap)
                continue
            if key in exclude:
                skipped.append(heapq.heappop(self._heap))
                continue
            found = key
            break
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        return found

    def __len__(self) -> int:
        return len(self._last)
