"""Fast replay and oracle policies: how much a policy would gain from knowing the future.

:func:`simulate` replays keyed requests with exactly the semantics of
:func:`kvcore.trace.replay.replay` without the engine, about 10x faster, so that policies can be
explored quickly: lookup touches the leading run of cached blocks; the blocks missing when the
store starts are reserved in order, evicting victims that are not this request's own
reservations; then they are committed (inserted) in order. A policy with an ``at(index)``
method is told the index of the request about to run, which lets the oracles below look up the
future.

The oracles evict among leaves of the prefix forest (tails first), from a seeded sample of
``sample`` leaves (deterministic):

- :class:`DeadFirstOracle`: a leaf never used again first, else the least recently used leaf.
- :class:`KnownRateOracle`: the leaf with the lowest long-run use rate of its block over the
  whole trace, ``(uses - 1) / (last use - first use + prior)`` in block accesses; with
  ``proven_only`` a block not used before its current stay gets one fixed rate instead (an
  online learner knows nothing of a block before its second use).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Container, Hashable, Sequence

from kvcore.interfaces import EvictionPolicy
from kvcore.trace.belady import NEVER, next_uses


def simulate(requests: Sequence[Sequence[Hashable]], capacity: int,
             policy: EvictionPolicy, by_use: Counter[int] | None = None) -> float:
    """Hit ratio of ``policy`` at ``capacity`` blocks, replayed as the engine replays it.

    ``by_use``, if given, counts the hits by how often their block was used before (capped at 6).
    """
    cached: set[Hashable] = set()
    used: Counter[Hashable] = Counter()
    hits = total = 0
    at = getattr(policy, "at", None)
    for index, keys in enumerate(requests):
        if not keys:
            continue
        if at is not None:
            at(index)
        run = 0
        while run < len(keys) and keys[run] in cached:
            run += 1
        for key in keys[:run]:
            policy.touch(key)  # type: ignore[arg-type]
        if by_use is not None:
            for key in keys[:run]:
                by_use[min(used[key], 6)] += 1
            used.update(keys)
        hits += run
        total += len(keys)
        present = [key in cached for key in keys]  # the engine checks once, before storing
        reserved: dict[Hashable, Hashable | None] = {}
        for i, key in enumerate(keys):
            if present[i] or key in reserved:
                continue
            parent = keys[i - 1] if i else None
            if not policy.admit(key, 1, parent):  # type: ignore[arg-type]
                continue
            while len(cached) + len(reserved) >= capacity:
                victim = policy.victim(reserved)  # type: ignore[arg-type]
                if victim is None:
                    break
                cached.discard(victim)
                policy.remove(victim)
            if len(cached) + len(reserved) < capacity:
                reserved[key] = parent
        for key, parent in reserved.items():
            cached.add(key)
            policy.insert(key, 1, parent)  # type: ignore[arg-type]
        if len(cached) > max(capacity, 0):
            raise RuntimeError(f"{len(cached)} blocks cached over a capacity of {capacity}")
    return hits / total if total else 0.0


class _SampledLeaves(EvictionPolicy):
    """Prefix forest with a list of leaves; victim = highest :meth:`score` of a sample."""

    def __init__(self, sample: int = 64, seed: int = 1) -> None:
        self._rng = random.Random(seed)
        self._sample = sample
        self._tick = 0
        self._parent: dict[Hashable, Hashable | None] = {}
        self._children: Counter[Hashable] = Counter()
        self._last: dict[Hashable, int] = {}
        self._hits: Counter[Hashable] = Counter()
        self._leaves: list[Hashable] = []
        self._pos: dict[Hashable, int] = {}

    def score(self, key: Hashable) -> float:
        """Larger is evicted first."""
        return float(self._tick - self._last[key])

    def _add_leaf(self, key: Hashable) -> None:
        self._pos[key] = len(self._leaves)
        self._leaves.append(key)

    def _drop_leaf(self, key: Hashable) -> None:
        index = self._pos.pop(key)
        last = self._leaves.pop()
        if index < len(self._leaves):
            self._leaves[index] = last
            self._pos[last] = index

    def insert(self, key, size, parent) -> None:  # type: ignore[no-untyped-def]
        self._tick += 1
        if key in self._last:
            self._last[key] = self._tick
            return
        parent = parent if parent in self._last else None
        self._parent[key] = parent
        self._last[key] = self._tick
        if parent is not None:
            if self._children[parent] == 0:
                self._drop_leaf(parent)
            self._children[parent] += 1
        self._add_leaf(key)

    def touch(self, key) -> None:  # type: ignore[no-untyped-def]
        if key in self._last:
            self._tick += 1
            self._last[key] = self._tick
            self._hits[key] += 1

    def remove(self, key) -> None:  # type: ignore[no-untyped-def]
        if key not in self._last:
            return
        del self._last[key]
        self._hits.pop(key, None)
        if key in self._pos:
            self._drop_leaf(key)
        self._children.pop(key, None)
        parent = self._parent.pop(key)
        if parent is not None and parent in self._last:
            self._children[parent] -= 1
            if self._children[parent] == 0:
                self._add_leaf(parent)

    def victim(self, exclude: Container = ()) -> Hashable | None:  # type: ignore[override]
        leaves = self._leaves
        best, best_score = None, -1.0
        draws = len(leaves) if len(leaves) <= self._sample else self._sample
        for _ in range(draws):
            key = leaves[self._rng.randrange(len(leaves))]
            if key not in exclude:
                value = self.score(key)
                if value > best_score:
                    best, best_score = key, value
        if best is None:
            best = next((k for k in leaves if k not in exclude), None)
        return best

    def __len__(self) -> int:
        return len(self._last)


class DeadFirstOracle(_SampledLeaves):
    """Evict a leaf that is never used again first, else the least recently used leaf."""

    name = "oracle_dead_first"

    def __init__(self, requests: Sequence[Sequence[Hashable]], **kwargs: int) -> None:
        super().__init__(**kwargs)
        self._rows = requests
        self._next = next_uses(requests)
        self._upcoming: dict[Hashable, int] = {}

    def at(self, index: int) -> None:
        for key, upcoming in zip(self._rows[index], self._next[index]):
            self._upcoming[key] = upcoming

    def score(self, key: Hashable) -> float:
        dead = self._upcoming.get(key, NEVER) == NEVER
        return super().score(key) + (float(NEVER) if dead else 0.0)


class KnownRateOracle(_SampledLeaves):
    """Evict the leaf whose block has the lowest long-run use rate over the whole trace."""

    name = "oracle_known_rate"

    def __init__(self, requests: Sequence[Sequence[Hashable]], prior: float = 30_000.0,
                 proven_only: bool = False, fresh_rate: float = 3e-5, **kwargs: int) -> None:
        super().__init__(**kwargs)
        first: dict[Hashable, int] = {}
        last: dict[Hashable, int] = {}
        uses: Counter[Hashable] = Counter()
        tick = 0
        for keys in requests:
            for key in keys:
                tick += 1
                first.setdefault(key, tick)
                last[key] = tick
                uses[key] += 1
        self._rate = {k: (uses[k] - 1 + 1e-3) / (last[k] - first[k] + prior) for k in uses}
        self._proven_only = proven_only
        self._fresh_rate = fresh_rate

        self._stored: set[Hashable] = set()
        self._proven: set[Hashable] = set()

    def insert(self, key, size, parent) -> None:  # type: ignore[no-untyped-def]
        if key in self._stored:
            self._proven.add(key)  # stored again after eviction: used before
        self._stored.add(key)
        super().insert(key, size, parent)

    def touch(self, key) -> None:  # type: ignore[no-untyped-def]
        self._proven.add(key)
        super().touch(key)

    def score(self, key: Hashable) -> float:
        if self._proven_only and key not in self._proven:
            return 1.0 / self._fresh_rate
        return 1.0 / self._rate.get(key, 1e-9)
