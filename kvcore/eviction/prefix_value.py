"""Prefix-aware eviction that protects proven chunks: the default policy (``prefix_value``).

1. **Tails first.** Only *leaves* of the prefix forest (chunks with no cached child) are
   evicted: a chunk is worthless once its predecessor is gone, so a prefix's head always
   outlives its tail.
2. **Classes with a learned reuse rate.** A chunk's class is how it entered (``cold``: stored by
   a request that hit nothing before it; ``extend``: stored after a prefix hit) times its hit count
   (0..7). Per class the policy counts entries and re-uses, counting as a re-use a chunk stored
   again soon after its eviction (a ghost list of evicted keys, ``ghost_factor`` times the index
   size), so the estimate is not blinded by its own evictions; counts decay.
3. **Fresh cold chunks are on probation.** A cold chunk never hit yet weighs ``beta`` (1/50) on
   top of its rate: one-off long documents cannot flush shared prefixes, while a proven chunk
   idle 50 times longer still goes (no pollution for ever).

The victim is the leaf with the largest idle time divided by its weight (rate x probation). With
equal weights it is LRU among leaves. In multi-turn chats the ``extend`` class is re-used often,
its learned rate is high and new turns stay; where suffixes are one-off questions it is low.

Options kept for measurement (docs/eviction.md): ``learned=False`` (fixed rates), ``alpha``
(weight x (1 + hits) ** alpha), ``k2`` (idle time counted from the use before last, LRU-2).

Cost: one heap per class (16), lazy deletion; O(log n) per operation; victim reads the heap tops.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Container

from kvcore.interfaces import EvictionPolicy
from kvcore.keys import ChunkKey

HIT_BUCKETS = 8
COLD, EXTEND = 0, 1
CLASSES = 2 * HIT_BUCKETS


def class_of(origin: int, hits: int) -> int:
    """Class index of a chunk stored as ``origin`` and hit ``hits`` times since."""
    return origin * HIT_BUCKETS + min(hits, HIT_BUCKETS - 1)


class _Node:
    __slots__ = ("parent", "children", "last", "prev", "origin", "hits")

    def __init__(self, parent: ChunkKey | None, last: int, origin: int, hits: int) -> None:
        self.parent = parent
        self.children = 0
        self.last = last
        self.prev = last
        self.origin = origin
        self.hits = hits


class PrefixValuePolicy(EvictionPolicy):
    """Evict the leaf with the largest idle time over its weight (see the module docstring)."""

    name = "prefix_value"

    def __init__(self, ghost_factor: float = 8.0, decay_window: int = 4, alpha: float = 0.0,
                 learned: bool = True, beta: float = 0.02, k2: bool = False) -> None:
        self._k2 = k2
        self._beta = beta
        self._alpha = alpha
        self._learned = learned
        self._tick = 0
        self._nodes: dict[ChunkKey, _Node] = {}
        self._heaps: list[list[tuple[int, ChunkKey]]] = [[] for _ in range(CLASSES)]
        self._entered = [1.0] * CLASSES
        self._reused = [0.5] * CLASSES
        self._ghost: OrderedDict[ChunkKey, tuple[int, int]] = OrderedDict()
        self._ghost_factor = ghost_factor
        self._decay_window = decay_window
        self._since_decay = 0.0
        self._pushes = 0

    # -- statistics ----------------------------------------------------------------------------

    def rate(self, cls: int) -> float:
        """Weight of class ``cls``: ``beta`` for fresh chunks, 1 for proven ones (see module)."""
        learned = (self._reused[cls] + 0.01) / (self._entered[cls] + 0.02) if self._learned else 1.0
        fresh = self._beta if cls == class_of(COLD, 0) else 1.0
        return fresh * learned * (1 + cls % HIT_BUCKETS) ** self._alpha

    def _enter(self, cls: int) -> None:
        self._entered[cls] += 1.0
        self._since_decay += 1.0
        if self._since_decay > self._decay_window * max(len(self._nodes), 1024):
            self._since_decay = 0.0
            self._entered = [x / 2 for x in self._entered]
            self._reused = [x / 2 for x in self._reused]

    # -- index -----------------------------------------------------------------------------------

    def _push(self, key: ChunkKey, node: _Node) -> None:
        if node.children == 0:
            heapq.heappush(self._heaps[class_of(node.origin, node.hits)], (self._stamp(node), key))
            self._pushes += 1
            if self._pushes > 4 * len(self._nodes) + 4096:
                self._compact()

    def _compact(self) -> None:
        self._pushes = 0
        for cls, heap in enumerate(self._heaps):
            self._heaps[cls] = [e for e in heap if self._current(cls, e)]
            heapq.heapify(self._heaps[cls])
            self._pushes += len(self._heaps[cls])

    def _stamp(self, node: _Node) -> int:
        """The tick a leaf's idle time counts from: its last use, or with ``k2`` the one before."""
        return node.prev if self._k2 and node.hits > 0 else node.last

    def _current(self, cls: int, entry: tuple[int, ChunkKey]) -> bool:
        node = self._nodes.get(entry[1])
        return (node is not None and self._stamp(node) == entry[0] and node.children == 0
                and class_of(node.origin, node.hits) == cls)

    def insert(self, key: ChunkKey, size: int, parent: ChunkKey | None) -> None:
        self._tick += 1
        node = self._nodes.get(key)
        if node is not None:  # re-inserted (unpinned): counts as a use
            node.prev, node.last = node.last, self._tick
            self._push(key, node)
            return
        known = self._nodes.get(parent) if parent is not None else None
        ghost = self._ghost.pop(key, None)
        prev = self._tick
        if ghost is not None:  # it came back soon after eviction: a hit we missed
            self._reused[ghost[0]] += 1.0
            origin, hits = divmod(ghost[0], HIT_BUCKETS)
            hits += 1
            prev = ghost[1]
        else:
            extend = known is not None and (known.hits > 0 or known.origin == EXTEND)
            origin, hits = (EXTEND if extend else COLD), 0
        node = _Node(parent if known is not None else None, self._tick, origin, hits)
        node.prev = prev
        self._nodes[key] = node
        self._enter(class_of(origin, hits))
        if known is not None:
            known.children += 1
        self._push(key, node)

    def touch(self, key: ChunkKey) -> None:
        node = self._nodes.get(key)
        if node is None:
            return
        self._tick += 1
        self._reused[class_of(node.origin, node.hits)] += 1.0
        node.hits += 1
        self._enter(class_of(node.origin, node.hits))
        node.prev = node.last
        node.last = self._tick
        self._push(key, node)

    def remove(self, key: ChunkKey) -> None:
        node = self._nodes.pop(key, None)
        if node is None:
            return
        self._ghost[key] = (class_of(node.origin, node.hits), node.last)
        while len(self._ghost) > self._ghost_factor * len(self._nodes) + 64:
            self._ghost.popitem(last=False)
        parent = self._nodes.get(node.parent) if node.parent is not None else None
        if parent is not None:
            parent.children -= 1
            self._push(node.parent, parent)  # type: ignore[arg-type]

    def victim(self, exclude: Container[ChunkKey] = ()) -> ChunkKey | None:
        best: ChunkKey | None = None
        best_score = -1.0
        for cls, heap in enumerate(self._heaps):
            top = self._top(cls, heap, exclude)
            if top is None:
                continue
            stamp, key = top  # the candidate's own stamp, not an excluded entry's
            score = (self._tick - stamp + 1) / self.rate(cls)
            if score > best_score:
                best, best_score = key, score
        return best

    def _top(self, cls: int, heap: list[tuple[int, ChunkKey]],
             exclude: Container[ChunkKey]) -> tuple[int, ChunkKey] | None:
        """The oldest current entry of a class's heap that is not excluded."""
        skipped = []
        found = None
        while heap:
            entry = heap[0]
            if not self._current(cls, entry):
                heapq.heappop(heap)
                continue
            if entry[1] in exclude:
                skipped.append(heapq.heappop(heap))
                continue
            found = entry
            break
        for entry in skipped:
            heapq.heappush(heap, entry)
        return found

    def __len__(self) -> int:
        return len(self._nodes)
