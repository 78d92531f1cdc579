"""Invariants of every built-in eviction policy, through the real CpuTier."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcore.eviction.arc import ARCPolicy
from kvcore.eviction.lru import LRUPolicy
from kvcore.eviction.prefix_lru import PrefixLRUPolicy
from kvcore.eviction.prefix_value import PrefixValuePolicy
from kvcore.eviction.s3fifo import S3FIFOPolicy
from kvcore.plugins import get_registry
from kvcore.tiers.cpu import CpuTier

POLICIES = ["lru", "prefix_lru", "prefix_value", "s3fifo", "arc"]
PREFIX_POLICIES = ["prefix_lru", "prefix_value"]


def key(i: int) -> bytes:
    return i.to_bytes(24, "little")


def make_tier(name: str, chunks: int, size: int = 8) -> CpuTier:
    return CpuTier(chunks * size, get_registry().policy_factory(name)())


def store_chain(tier: CpuTier, ids: list[int], size: int = 8) -> None:
    for i, ident in enumerate(ids):
        tier.put_one(key(ident), [bytes(size)], key(ids[i - 1]) if i else None)


@pytest.mark.parametrize("name", POLICIES)
def test_registered_through_hook(name: str) -> None:
    assert get_registry().policy_factory(name)().name == name


@pytest.mark.parametrize("name", POLICIES)
@settings(max_examples=25, deadline=None)
@given(chains=st.lists(st.lists(st.integers(0, 60), min_size=1, max_size=12), max_size=30),
       capacity=st.integers(1, 20))
def test_budget_held_and_index_matches(name: str, chains: list[list[int]], capacity: int) -> None:
    tier = make_tier(name, capacity)
    for chain in chains:
        store_chain(tier, list(dict.fromkeys(chain)))
        usage = tier.usage()
        assert usage.used_bytes <= usage.budget_bytes
        assert len(tier.policy) == usage.chunks


@pytest.mark.parametrize("name", POLICIES)
def test_pinned_chunks_never_evicted(name: str) -> None:
    tier = make_tier(name, 4)
    store_chain(tier, [1, 2])
    assert tier.pin([key(1), key(2)]) == 2
    for start in range(100, 400, 10):
        store_chain(tier, list(range(start, start + 5)))
    assert tier.contains([key(1), key(2)]) == [True, True]
    assert tier.usage().used_bytes <= tier.usage().budget_bytes


@pytest.mark.parametrize("name", PREFIX_POLICIES)
def test_head_outlives_tail(name: str) -> None:
    tier = make_tier(name, 6)
    store_chain(tier, [1, 2, 3, 4])
    for start in range(100, 140, 2):
        store_chain(tier, [start, start + 1])
        present = tier.contains([key(i) for i in (1, 2, 3, 4)])
        # a cached block always has its whole prefix cached
        assert present == sorted(present, reverse=True)


def test_prefix_value_protects_hit_prefix_from_scan() -> None:
    tier = make_tier("prefix_value", 20)
    store_chain(tier, [1, 2, 3])
    for _ in range(3):
        tier.touch([key(1), key(2), key(3)])
    store_chain(tier, list(range(1000, 1060)))  # a one-off long document
    assert tier.contains([key(1), key(2), key(3)]) == [True, True, True]
    lru = make_tier("lru", 20)
    store_chain(lru, [1, 2, 3])
    lru.touch([key(1), key(2), key(3)])
    store_chain(lru, list(range(1000, 1060)))
    assert lru.contains([key(1)]) == [False]


def test_prefix_value_victim_skips_excluded() -> None:
    policy = PrefixValuePolicy()
    policy.insert(key(1), 8, None)
    policy.insert(key(2), 8, None)
    assert policy.victim({key(1), key(2)}) is None
    assert policy.victim({key(1)}) == key(2)
    policy.remove(key(2))
    assert policy.victim() == key(1)
    assert len(policy) == 1


def test_lru_keeps_its_order() -> None:
    policy = LRUPolicy()
    for i in range(3):
        policy.insert(key(i), 8, None)
    policy.touch(key(0))
    assert policy.victim() == key(1)
    assert isinstance(PrefixLRUPolicy().victim(), type(None))


def test_prefix_value_excluded_entry_does_not_lend_its_age() -> None:
    """Review bug (issue 16): a class was scored with its excluded head's older stamp, so with
    equal weights the newer of two candidates was evicted."""
    policy = PrefixValuePolicy(learned=False, beta=1.0)  # every class weighs 1: LRU of leaves
    a, b, c = b"a" * 24, b"b" * 24, b"c" * 24
    policy.insert(a, 1, None)  # fresh class, stamp 1
    policy.insert(c, 1, None)
    policy.touch(c)  # hit class, stamp 3
    policy.insert(b, 1, None)  # fresh class, stamp 4
    assert policy.victim() == a
    assert policy.victim(exclude={a}) == c  # older than b; the bug returned b


@pytest.mark.parametrize("name", ["s3fifo", "arc"])
def test_chunk_hit_once_survives_a_scan(name: str) -> None:
    """Both keep a reused chunk through a stream of one-off chunks, which LRU does not (the
    LRU half of this is in test_prefix_value_protects_hit_prefix_from_scan)."""
    tier = make_tier(name, 20)
    store_chain(tier, [1, 2, 3])
    tier.touch([key(1), key(2), key(3)])
    for start in range(1000, 1600, 3):
        store_chain(tier, [start, start + 1, start + 2])
    assert tier.contains([key(1), key(2), key(3)]) == [True, True, True]
    assert tier.usage().used_bytes <= tier.usage().budget_bytes


def test_s3fifo_one_off_chunks_leave_before_main() -> None:
    policy = S3FIFOPolicy(small_share=0.25)
    for i in range(4):
        policy.insert(key(i), 8, None)
    policy.touch(key(0))
    # key 0 was hit on probation: it moves to main, and the next new chunk is the victim
    assert policy.victim() == key(1)
    policy.remove(key(1))
    assert key(1) in policy._ghost
    assert policy.victim(exclude={key(2)}) == key(3)
    # a ghost stored again skips probation
    policy.insert(key(1), 8, None)
    assert key(1) in policy._main and key(1) not in policy._ghost
    assert len(policy) == 4


def test_s3fifo_hit_main_chunk_goes_round_again() -> None:
    policy = S3FIFOPolicy(small_share=0.5)
    for i in range(2):
        policy.insert(key(i), 8, None)
        policy.touch(key(i))
    assert policy.victim() == key(0)  # both promoted, then key 0 is main's oldest, unhit
    policy.touch(key(0))
    assert policy.victim() == key(1)
    policy.remove(key(5))  # unknown keys are ignored
    policy.remove(key(1))
    assert key(1) not in policy._ghost  # main's victims leave no ghost
    assert policy.victim({key(0)}) is None


def test_arc_ghost_hits_move_the_target() -> None:
    policy = ARCPolicy()
    for i in range(4):
        policy.insert(key(i), 8, None)
    policy.touch(key(3))  # T2 = [3], T1 = [0, 1, 2]
    assert policy.victim() == key(0)
    policy.remove(key(0))  # evicted: remembered in B1
    policy.insert(key(0), 8, None)  # asked again: recency was evicted too early
    assert policy.target >= 1
    assert policy.victim() == key(1)  # T1 (1, 2) is larger than the target
    policy.remove(key(1))
    before = policy.target
    policy.touch(key(2))  # T1 empty: victims now come from T2, least recent first
    assert policy.victim() == key(3)
    policy.remove(key(3))  # remembered in B2
    policy.insert(key(3), 8, None)
    assert policy.target < max(before, 1.0)
    assert policy.victim(exclude={key(0), key(2), key(3)}) is None
    policy.remove(key(0))  # a delete, not an eviction: no ghost
    assert len(policy) == 2
