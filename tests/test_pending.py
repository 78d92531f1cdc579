"""PendingStores and the engine's use of it: keys are pending exactly while their store runs."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from kvcore.config import load_settings
from kvcore.engine import CacheEngine
from kvcore.keys import Namespace
from kvcore.pending import PendingStores


def test_multiset_add_remove_and_bounded_wait() -> None:
    pending = PendingStores()
    a, b = b"a" * 24, b"b" * 24
    pending.add([a, b])
    pending.add([a])
    pending.remove([a])
    assert pending.contains([a, b, b"c" * 24]) == [True, True, False]  # a was added twice
    assert not pending.wait([a], timeout_s=0.05)
    assert pending.wait([b"c" * 24], timeout_s=0.0)  # never pending: no wait

    releaser = threading.Timer(0.1, pending.remove, args=([a, b],))
    releaser.start()
    assert pending.wait([a, b], timeout_s=10.0)
    assert len(pending) == 0


class GatedSource:
    """A ChunkSource whose fill waits for ``gate``: a store held open by the test."""

    def __init__(self, payloads: list[np.ndarray]) -> None:
        self.payloads = payloads
        self.gate = threading.Event()

    def chunk_nbytes(self) -> int:
        return self.payloads[0].nbytes

    def fill(self, indices: Sequence[int], dests: Sequence[np.ndarray]) -> None:
        assert self.gate.wait(10)
        for i, dest in zip(indices, dests):
            dest[:] = self.payloads[i]


def test_engine_keys_are_pending_until_committed() -> None:
    with CacheEngine(load_settings(chunk_size=4)) as engine:
        keys = engine.keys_for(Namespace("pending"), list(range(12)))
        source = GatedSource([np.full(64, i, dtype=np.uint8) for i in range(3)])
        handle = engine.store(keys, source)
        assert engine.pending.contains(keys) == [True] * 3
        assert engine.memory.contains(keys) == [False] * 3
        source.gate.set()
        assert engine.pending.wait(keys, timeout_s=10.0)
        assert handle.wait(10) == 3
        assert engine.memory.contains(keys) == [True] * 3  # committed before leaving pending
        assert len(engine.pending) == 0


def test_failed_store_leaves_nothing_pending() -> None:
    class Broken(GatedSource):
        def fill(self, indices: Sequence[int], dests: Sequence[np.ndarray]) -> None:
            raise RuntimeError("the engine's blocks are gone")

    with CacheEngine(load_settings(chunk_size=4)) as engine:
        keys = engine.keys_for(Namespace("pending"), list(range(8)))
        assert engine.store(keys, Broken([np.zeros(8, np.uint8)] * 2)).wait(10) == 0
        assert engine.pending.wait(keys, timeout_s=10.0)
        assert engine.memory.contains(keys) == [False, False]
