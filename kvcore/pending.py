"""Keys whose store is queued or running: what the CPU tier will hold in a moment.

The engine stores asynchronously, so a chunk is absent from the CPU tier for a few milliseconds
after ``CacheEngine.store`` returns. A peer that asks during that window (prefill/decode: the
decode side asks as soon as the prefill answer is out) should find the chunk and wait for it
rather than recompute; :class:`PendingStores` lets a lower tier (kvcore-nixl's server) see those
keys and wait, with a bound, until their stores end.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence

from kvcore.keys import ChunkKey


class PendingStores:
    """A multiset of keys being stored, with a wait for them to leave. Thread-safe."""

    def __init__(self) -> None:
        self._keys: Counter[ChunkKey] = Counter()
        self._changed = threading.Condition()

    def add(self, keys: Sequence[ChunkKey]) -> None:
        with self._changed:
            self._keys.update(keys)

    def remove(self, keys: Sequence[ChunkKey]) -> None:
        """The stores of ``keys`` ended (committed, rejected or failed)."""
        with self._changed:
            self._keys.subtract(keys)
            for key in keys:
                if self._keys[key] <= 0:
                    del self._keys[key]
            self._changed.notify_all()

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._changed:
            return [key in self._keys for key in keys]

    def wait(self, keys: Sequence[ChunkKey], timeout_s: float) -> bool:
        """Wait until no key of ``keys`` is pending, at most ``timeout_s``; True if none is."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while any(key in self._keys for key in keys):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True

    def __len__(self) -> int:
        with self._changed:
            return len(self._keys)
