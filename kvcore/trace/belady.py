"""Belady's clairvoyant bound for a prefix cache of ``capacity`` blocks.

Replays the same block sequence as :mod:`kvcore.trace.replay` (a request hits its leading run of
cached blocks, then every block of it is cached) but evicts the block whose next use is farthest
in the future, and does not admit a block whose next use is farther than every cached one
(never used again: not admitted). O(log n) per block with a lazy max-heap.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Hashable, Sequence

NEVER = 1 << 62


def next_uses(requests: Sequence[Sequence[Hashable]]) -> list[list[int]]:
    """For each block of each request, the index of the next request using it (or NEVER)."""
    upcoming: dict[Hashable, int] = {}
    out: list[list[int]] = [[] for _ in requests]
    for index in range(len(requests) - 1, -1, -1):
        row = []
        for block in requests[index]:
            row.append(upcoming.get(block, NEVER))
        for block in requests[index]:
            upcoming[block] = index
        out[index] = row
    return out


def belady_hits(requests: Sequence[Sequence[Hashable]], capacity: int,
                by_use: Counter[int] | None = None,
                runs: list[int] | None = None) -> tuple[int, int]:
    """(hit blocks, total blocks) of the clairvoyant policy at ``capacity`` blocks.

    ``by_use``, if given, counts the hits by how often their block was used before (capped at 6);
    ``runs``, if given, gets each request's leading hit run.
    """
    following = next_uses(requests)
    used: Counter[Hashable] = Counter()
    cached: dict[Hashable, int] = {}  # block -> its next use
    heap: list[tuple[int, int, Hashable]] = []  # (-next use, tie, block)
    hits = total = 0
    tie = 0
    for blocks, nexts in zip(requests, following):
        total += len(blocks)
        run = 0
        while run < len(blocks) and blocks[run] in cached:
            run += 1
        hits += run
        if runs is not None:
            runs.append(run)
        if by_use is not None:
            for block in blocks[:run]:
                by_use[min(used[block], 6)] += 1
            used.update(blocks)
        for block, upcoming in zip(blocks, nexts):
            if block in cached:
                cached[block] = upcoming
            elif upcoming == NEVER or capacity <= 0:
                continue
            else:
                while len(cached) >= capacity:
                    far, _, victim = heap[0]
                    if cached.get(victim) != -far:
                        heapq.heappop(heap)
                        continue
                    if -far <= upcoming:
                        break  # the new block is the farthest: bypass it
                    heapq.heappop(heap)
                    del cached[victim]
                if len(cached) >= capacity:
                    continue
                cached[block] = upcoming
            tie += 1
            heapq.heappush(heap, (-upcoming, tie, block))
    return hits, total
