"""ARC (Megiddo and Modha, FAST 2003): recency and frequency lists whose split adapts.

``T1`` holds chunks hit once (stored, never hit since), ``T2`` chunks hit again; ``B1`` and
``B2`` remember the keys recently evicted from each. A chunk stored again while its key is in
``B1`` says recency was evicted too early: the target size ``p`` of ``T1`` grows; one in
``B2`` shrinks it. A victim comes from ``T1`` while ``T1`` is larger than ``p``, else from
``T2``, least recently used first.

The tier's budget is in bytes while ARC counts entries: the capacity ``c`` here is the number
of chunks resident when the tier asks for room, which is what its budget holds at that moment.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container

from kvcore.eviction.queues import first_not_in as _first
from kvcore.interfaces import EvictionPolicy
from kvcore.keys import ChunkKey

_Queue = OrderedDict[ChunkKey, None]


class ARCPolicy(EvictionPolicy):
    """Adaptive replacement over four ordered dicts (least recent first)."""

    name = "arc"

    def __init__(self) -> None:
        self._t1: _Queue = OrderedDict()
        self._t2: _Queue = OrderedDict()
        self._b1: _Queue = OrderedDict()
        self._b2: _Queue = OrderedDict()
        self._p = 0.0
        self._proposed: ChunkKey | None = None
        """The last victim named (ghosted when the tier removes it)."""

    @property
    def target(self) -> float:
        """``p``: how many chunks ``T1`` should hold."""
        return self._p

    def insert(self, key: ChunkKey, size: int, parent: ChunkKey | None) -> None:
        self._t1.pop(key, None)
        self._t2.pop(key, None)
        capacity = len(self._t1) + len(self._t2) + 1
        if key in self._b1:
            self._p = min(capacity, self._p + max(len(self._b2) / len(self._b1), 1.0))
            del self._b1[key]
            self._t2[key] = None
        elif key in self._b2:
            self._p = max(0.0, self._p - max(len(self._b1) / len(self._b2), 1.0))
            del self._b2[key]
            self._t2[key] = None
        else:
            self._t1[key] = None
        self._trim_ghosts(capacity)

    def touch(self, key: ChunkKey) -> None:
        if key in self._t1:
            del self._t1[key]
            self._t2[key] = None
        elif key in self._t2:
            self._t2.move_to_end(key)

    def remove(self, key: ChunkKey) -> None:
        evicted = key == self._proposed
        if key in self._t1:
            del self._t1[key]
            if evicted:
                self._b1[key] = None
        elif key in self._t2:
            del self._t2[key]
            if evicted:
                self._b2[key] = None
        else:
            return
        self._proposed = None
        self._trim_ghosts(len(self) + 1)  # the tier makes room for one chunk at a time

    def victim(self, exclude: Container[ChunkKey] = ()) -> ChunkKey | None:
        recent = _first(self._t1, exclude)
        frequent = _first(self._t2, exclude)
        if recent is not None and (frequent is None or len(self._t1) > self._p):
            self._proposed = recent
        else:
            self._proposed = frequent if frequent is not None else recent
        return self._proposed

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)

    def _trim_ghosts(self, capacity: int) -> None:
        """Keep ``|T1| + |B1| <= c`` and all four lists within ``2c``."""
        capacity = max(capacity, 1)
        while self._b1 and len(self._t1) + len(self._b1) > capacity:
            self._b1.popitem(last=False)
        while self._b2 and len(self) + len(self._b1) + len(self._b2) > 2 * capacity:
            self._b2.popitem(last=False)
