"""CPU tier: hard budget, pins, readers hold chunks, thread safety."""

from __future__ import annotations

import threading

import pytest

from kvcore.eviction.lru import LRUPolicy
from kvcore.eviction.prefix_lru import PrefixLRUPolicy
from kvcore.testing.tier_contract import TierContract, make_keys
from kvcore.tiers.cpu import CpuTier


class TestCpuTierContract(TierContract):
    @pytest.fixture
    def tier(self) -> CpuTier:
        return CpuTier(1024 * 1024, LRUPolicy())

    def framed(self, key: bytes, payload: bytes) -> list:
        return [payload]

    def unframed(self, key: bytes, value: object) -> bytes | None:
        return bytes(value)  # type: ignore[arg-type]


def test_budget_never_exceeded_under_concurrent_reservations() -> None:
    tier = CpuTier(10_000, LRUPolicy())
    keys = make_keys(400, tenant="race")
    peaks: list[int] = []

    def work(part: list[bytes]) -> None:
        for key in part:
            buf = tier.reserve(key, 999)
            if buf is not None:
                buf[:] = 7
                tier.commit(key)
            peaks.append(tier.usage().used_bytes)

    threads = [threading.Thread(target=work, args=(keys[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(peaks) <= 10_000
    assert tier.usage().chunks == 10


def test_acquired_chunk_is_not_evicted() -> None:
    tier = CpuTier(3000, LRUPolicy())
    keys = make_keys(6, tenant="hold")
    tier.put([(keys[0], [b"a" * 1000])])
    (view,) = tier.acquire([keys[0]])
    assert view is not None
    for key in keys[1:]:
        tier.put([(key, [b"b" * 1000])])
    assert tier.contains([keys[0]]) == [True]
    assert bytes(view) == b"a" * 1000
    tier.release([view])
    for key in keys[1:4]:
        tier.delete([key])
        tier.put([(key, [b"c" * 1000])])
    tier.put([(make_keys(1, tenant="new")[0], [b"d" * 1000])])
    assert tier.usage().used_bytes <= 3000


def test_pinned_chunks_survive_pressure_until_unpinned() -> None:
    tier = CpuTier(4000, LRUPolicy())
    pinned = make_keys(2, tenant="pin")
    for key in pinned:
        tier.put([(key, [b"p" * 1000])])
    assert tier.pin(pinned) == 2
    for key in make_keys(20, tenant="pressure"):
        tier.put([(key, [b"x" * 1000])])
    assert tier.contains(pinned) == [True, True]
    assert tier.usage().used_bytes <= 4000
    tier.unpin(pinned)
    for key in make_keys(20, tenant="pressure2"):
        tier.put([(key, [b"y" * 1000])])
    assert tier.contains(pinned) == [False, False]


def test_full_of_pinned_chunks_rejects_new_stores() -> None:
    tier = CpuTier(2000, LRUPolicy())
    keys = make_keys(3, tenant="full")
    tier.put([(keys[0], [b"1" * 1000]), (keys[1], [b"2" * 1000])])
    tier.pin(keys[:2])
    assert tier.put([(keys[2], [b"3" * 1000])]) == [False]
    assert tier.reserve(keys[2], 5000) is None  # larger than the whole budget


def test_views_are_read_only() -> None:
    tier = CpuTier(2000, LRUPolicy())
    key = make_keys(1)[0]
    tier.put([(key, [b"z" * 10])])
    (view,) = tier.acquire([key])
    with pytest.raises(TypeError):
        view[0] = 1  # type: ignore[index]
    tier.release([view])


def test_only_the_holder_of_a_view_ends_its_hold() -> None:
    """A view not handed out by this tier, or one released already, ends nothing: another
    reader's chunk stays held (never evicted under it) until that reader releases."""
    tier = CpuTier(2000, LRUPolicy())
    key, other = make_keys(2, tenant="holder")
    tier.put([(key, [b"a" * 1000])])
    (mine,) = tier.acquire([key])
    (theirs,) = tier.acquire([key])
    assert mine is not None and theirs is not None
    tier.release([mine])
    tier.release([mine])  # twice: the second ends nothing
    tier.release([memoryview(b"a" * 1000), None])  # a view from elsewhere: ignored
    assert tier.delete([key]) == 0  # still held by the other reader
    assert tier.put([(other, [b"b" * 1500])]) == [False]  # and not evicted for room
    assert bytes(theirs) == b"a" * 1000
    tier.release([theirs])
    assert tier.put([(other, [b"b" * 1500])]) == [True]  # now evictable
    assert tier.contains([key]) == [False]


def test_prefix_policy_evicts_tails_before_heads() -> None:
    tier = CpuTier(5 * 100, PrefixLRUPolicy())
    chain = make_keys(5, tenant="chain")
    for i, key in enumerate(chain):
        buf = tier.reserve(key, 100, chain[i - 1] if i else None)
        assert buf is not None
        tier.commit(key)
    tier.touch(chain)  # head first, as a lookup does: plain LRU would now evict the head
    newcomer = make_keys(1, tenant="other")[0]
    assert tier.put_one(newcomer, [b"n" * 100])
    assert tier.contains(chain) == [True, True, True, True, False]


class _LyingUsageTier(CpuTier):
    """Holds chunks like the CPU tier but reports itself empty."""

    def usage(self):  # type: ignore[no-untyped-def]
        from kvcore.interfaces import TierUsage

        return TierUsage(0, self.budget_bytes if hasattr(self, "budget_bytes") else 1, 0)


def test_contract_catches_a_tier_whose_usage_lies() -> None:
    """Review bug (issue 16): the contract claimed to test the budget, but a tier whose
    usage() lies passed it."""
    contract = TestCpuTierContract()
    tier = _LyingUsageTier(1024 * 1024, LRUPolicy())
    with pytest.raises(AssertionError, match="usage\\(\\) reports"):
        contract.test_usage_within_budget(tier)
    contract.test_usage_within_budget(CpuTier(1024 * 1024, LRUPolicy()))  # the honest one passes
