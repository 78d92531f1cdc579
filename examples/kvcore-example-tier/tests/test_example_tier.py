"""The example plugin: its tier passes kvcore's tier contract, its policy and attachment work
behind a real engine."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import pytest

from kvcore.engine import CacheEngine
from kvcore.eviction.lru import LRUPolicy
from kvcore.plugins import get_registry
from kvcore.testing.tier_contract import LowerTierContract, make_keys
from kvcore_example_tier import DictTier, FifoPolicy
from kvcore_example_tier.attachment import UsageLog


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


def test_fifo_policy_evicts_in_store_order_whatever_was_hit() -> None:
    policy = FifoPolicy()
    tier = DictTier(3 * 1000, policy)
    keys = make_keys(4, tenant="fifo")
    for key in keys[:3]:
        assert tier.put([(key, [os.urandom(1000)])]) == [True]
    assert tier.get([keys[0]])[0] is not None  # a hit: LRU would now evict keys[1]
    assert tier.put([(keys[3], [os.urandom(1000)])]) == [True]
    assert tier.contains(keys) == [False, True, True, True]
    assert policy.victim(exclude={keys[1]}) == keys[2]


def test_policy_and_attachment_come_through_the_installed_entry_point(
    make_engine: Callable[..., CacheEngine], caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """KVCORE_EVICTION=example_fifo chooses the plugin's policy for every tier, and
    KVCORE_EXAMPLE_USAGE_LOG_S starts its attachment beside the engine, closed with it."""
    registry = get_registry(reload=True)
    assert "example_fifo" in registry.eviction_policies
    assert "example_usage_log" in registry.attachments
    monkeypatch.setenv("KVCORE_EXAMPLE_USAGE_LOG_S", "0.05")
    with caplog.at_level(logging.INFO, logger="kvcore.example"):
        engine = make_engine(tiers=["cpu", "example"], eviction="example_fifo", chunk_size=4)
        usage_log = engine.attachments["example_usage_log"]
        assert isinstance(usage_log, UsageLog)
        assert isinstance(engine.lower[0].tier.policy, FifoPolicy)
        deadline = time.monotonic() + 10
        while usage_log.lines < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        engine.close()
    assert usage_log.lines >= 2 and not usage_log._thread.is_alive()
    assert "kvcore example usage: cpu 0/" in caplog.text


def test_the_attachment_is_off_by_default(make_engine: Callable[..., CacheEngine]) -> None:
    engine = make_engine(chunk_size=4)
    assert "example_usage_log" not in engine.attachments
