"""The example plugin passes kvcore's tier contract and works behind a real engine."""

from __future__ import annotations

import os

import pytest

from kvcore.eviction.lru import LRUPolicy
from kvcore.testing.tier_contract import LowerTierContract, make_keys
from kvcore_example_tier import DictTier


class TestDictTier(LowerTierContract):
    @pytest.fixture
    def tier(self) -> DictTier:
        tier = DictTier(1024 * 1024, LRUPolicy())
        tier.name = "example"
        return tier


def test_budget_evicts_oldest() -> None:
    tier = DictTier(3 * 1000, LRUPolicy())
    keys = make_keys(4, tenant="evict")
    for key in keys:
        assert tier.put([(key, [os.urandom(1000)])]) == [True]
    assert tier.contains(keys) == [False, True, True, True]
    assert tier.usage().used_bytes == 3000
