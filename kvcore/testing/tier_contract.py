"""The contract every :class:`~kvcore.interfaces.Tier` must pass.

Use it from a plugin's tests by subclassing and providing a ``tier`` fixture::

    from kvcore.testing.tier_contract import LowerTierContract

    class TestMyTier(LowerTierContract):
        @pytest.fixture
        def tier(self, tmp_path):
            return MyTier(...)          # budget of at least ``min_budget`` bytes
        chunk_bytes = 4096

:class:`TierContract` holds what every tier does; :class:`LowerTierContract` (for any tier used
after ``cpu``) adds tests that store values through a real :class:`~kvcore.engine.CacheEngine`
too, so framing, verification, write-behind and promotion are exercised with the tier as a lower
tier.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from kvcore import chunk_format
from kvcore.config import load_settings
from kvcore.engine import CacheEngine
from kvcore.eviction.lru import LRUPolicy
from kvcore.interfaces import Tier
from kvcore.keys import Namespace, chunk_keys
from kvcore.tiers.cpu import CpuTier


def make_keys(n: int, tenant: str = "") -> list[bytes]:
    return chunk_keys(Namespace("contract-model", tenant=tenant), list(range(n * 4)), 4)


class TierContract:
    """Behaviour shared by all tiers. Subclasses provide the ``tier`` fixture."""

    chunk_bytes = 4096

    def framed(self, key: bytes, payload: bytes) -> list:
        """The value as the engine hands it to this tier (framed, for lower tiers)."""
        return chunk_format.encode(key, payload, 4)

    def unframed(self, key: bytes, value: object) -> bytes | None:
        """The payload inside a value read back from this tier."""
        payload = chunk_format.decode(key, value)  # type: ignore[arg-type]
        return None if payload is None else bytes(payload)

    def test_put_get_round_trip(self, tier: Tier) -> None:
        keys = make_keys(4)
        payloads = [os.urandom(self.chunk_bytes) for _ in keys]
        assert all(tier.put([(k, self.framed(k, p)) for k, p in zip(keys, payloads)]))
        values = tier.get(keys)
        for key, payload, value in zip(keys, payloads, values):
            assert value is not None
            assert self.unframed(key, value) == payload

    def test_missing_keys(self, tier: Tier) -> None:
        keys = make_keys(3, tenant="absent")
        assert tier.contains(keys) == [False, False, False]
        assert tier.get(keys) == [None, None, None]
        assert tier.delete(keys) == 0

    def test_contains_and_delete(self, tier: Tier) -> None:
        keys = make_keys(3, tenant="del")
        tier.put([(k, self.framed(k, os.urandom(self.chunk_bytes))) for k in keys])
        assert tier.contains(keys) == [True, True, True]
        assert tier.delete(keys[:2]) == 2
        assert tier.contains(keys) == [False, False, True]

    usage_staleness_s = 0.0
    """How old a tier's ``usage()`` may be (a tier that caches a costly reading sets this)."""

    def test_usage_within_budget(self, tier: Tier) -> None:
        keys = make_keys(64, tenant="budget")
        for key in keys:
            tier.put([(key, self.framed(key, os.urandom(self.chunk_bytes)))])
            usage = tier.usage()
            assert usage.used_bytes <= usage.budget_bytes
            if not self.usage_staleness_s:
                self.check_usage(tier, keys)
        time.sleep(self.usage_staleness_s)
        self.check_usage(tier, keys)

    def check_usage(self, tier: Tier, keys: list[bytes]) -> None:
        """``usage()`` tells the truth: it counts the chunks the tier holds, at least their
        payload bytes, and stays within the budget."""
        usage = tier.usage()
        held = sum(tier.contains(keys))
        assert usage.chunks >= held, f"usage() reports {usage.chunks} chunks, {held} are held"
        assert usage.used_bytes >= held * self.chunk_bytes, (
            f"usage() reports {usage.used_bytes} bytes for {held} chunks of "
            f"{self.chunk_bytes} bytes")
        assert usage.used_bytes <= usage.budget_bytes

    def test_concurrent_puts_and_gets(self, tier: Tier) -> None:
        keys = make_keys(32, tenant="threads")
        payloads = {k: os.urandom(self.chunk_bytes) for k in keys}
        errors: list[str] = []

        def writer(part: list[bytes]) -> None:
            for k in part:
                tier.put([(k, self.framed(k, payloads[k]))])

        def reader() -> None:
            for _ in range(20):
                for k, v in zip(keys, tier.get(keys)):
                    if v is not None and self.unframed(k, v) != payloads[k]:
                        errors.append(k.hex())

        threads = [threading.Thread(target=writer, args=(keys[i::4],)) for i in range(4)]
        threads += [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []



class LowerTierContract(TierContract):
    """Additional behaviour of tiers used below the CPU tier (framed values, write-behind)."""

    def test_behind_engine_write_behind_and_promotion(self, tier: Tier) -> None:
        settings = load_settings(chunk_size=4, cpu_size=64 * 1024**2, tiers=["cpu", tier.name])
        cpu = CpuTier(settings.cpu_size, LRUPolicy())
        engine = CacheEngine(settings, tiers=[cpu, tier])
        try:
            keys = make_keys(5, tenant="engine")
            payloads = [os.urandom(self.chunk_bytes) for _ in keys]
            assert engine.store_buffers(keys, payloads).wait(10) == 5
            assert engine.flush(30)
            assert all(tier.contains(keys))
            engine.clear(tier="cpu")
            assert cpu.usage().chunks == 0
            assert engine.lookup(keys, prefetch=False).chunks == 5
            with engine.acquire(keys) as lease:
                assert [bytes(v) for v in lease.views] == payloads
        finally:
            engine.close()

    def test_corrupted_value_is_a_miss(self, tier: Tier) -> None:
        settings = load_settings(chunk_size=4, tiers=["cpu", tier.name])
        cpu = CpuTier(64 * 1024**2, LRUPolicy())
        engine = CacheEngine(settings, tiers=[cpu, tier])
        try:
            keys = make_keys(2, tenant="corrupt")
            good = os.urandom(self.chunk_bytes)
            bad = bytearray(b"".join(bytes(p) for p in self.framed(keys[1], good)))
            bad[-1] ^= 0xFF
            tier.put([(keys[0], self.framed(keys[0], good)), (keys[1], [bytes(bad)])])
            with engine.acquire(keys) as lease:
                assert len(lease) == 1 and bytes(lease.views[0]) == good
            assert engine.metrics.get("corrupt_chunks_total", tier.name) == 1
        finally:
            engine.close()


@pytest.fixture
def contract_keys() -> list[bytes]:
    return make_keys(8)
