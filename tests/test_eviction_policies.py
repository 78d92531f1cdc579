"""Invariants of every built-in eviction policy, through the real CpuTier."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcore.eviction.lru import LRUPolicy
from kvcore.eviction.prefix_lru import PrefixLRUPolicy
from kvcore.eviction.prefix_value import PrefixValuePolicy
from kvcore.plugins import get_registry
from kvcore.tiers.cpu import CpuTier

POLICIES = ["lru", "prefix_lru", "prefix_value"]
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
