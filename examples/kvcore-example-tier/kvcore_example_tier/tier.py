"""The ``example`` tier: a byte-budgeted dict, evicted by the policy the engine hands it.

Being a lower tier, it receives values framed by the engine (header + checksum), so it stores
opaque bytes and needs no integrity code of its own.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

from kvcore.config import load_settings
from kvcore.interfaces import Buffer, EvictionPolicy, Tier, TierContext, TierUsage
from kvcore.keys import ChunkKey
from kvcore_example_tier.settings import ExampleSettings


class DictTier(Tier):
    """Values in a dict, evicted by the configured policy when the budget is reached."""

    def __init__(self, budget_bytes: int, policy: EvictionPolicy) -> None:
        self.budget = budget_bytes
        self.policy = policy
        self._values: dict[ChunkKey, bytes] = {}
        self._used = 0
        self._lock = threading.Lock()

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._lock:
            return [k in self._values for k in keys]

    def get(self, keys: Sequence[ChunkKey]) -> list[Buffer | None]:
        with self._lock:
            for key in keys:
                if key in self._values:
                    self.policy.touch(key)
            return [self._values.get(k) for k in keys]

    def put(self, items: Sequence[tuple[ChunkKey, Sequence[Buffer]]]) -> list[bool]:
        results = []
        with self._lock:
            for key, parts in items:
                value = b"".join(bytes(p) for p in parts)
                if key in self._values or len(value) > self.budget:
                    results.append(key in self._values)
                    continue
                while self._used + len(value) > self.budget:
                    victim = self.policy.victim()
                    if victim is None:
                        break
                    self._remove(victim)
                if self._used + len(value) > self.budget:
                    results.append(False)
                    continue
                self._values[key] = value
                self._used += len(value)
                self.policy.insert(key, len(value), None)
                results.append(True)
        return results

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        with self._lock:
            present = [k for k in keys if k in self._values]
            for key in present:
                self._remove(key)
            return len(present)

    def _remove(self, key: ChunkKey) -> None:
        self._used -= len(self._values.pop(key))
        self.policy.remove(key)

    def usage(self) -> TierUsage:
        with self._lock:
            return TierUsage(self._used, self.budget, len(self._values))

    def iter_keys(self) -> Iterator[ChunkKey]:
        with self._lock:
            return iter(list(self._values))


def make_tier(context: TierContext) -> DictTier:
    settings = load_settings(ExampleSettings)
    return DictTier(settings.size, context.make_policy())
