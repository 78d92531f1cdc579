"""The fast replay matches the engine's replay; the oracle bounds behave as documented."""

from __future__ import annotations

from collections import Counter

import pytest

from kvcore.eviction.lru import LRUPolicy
from kvcore.eviction.prefix_value import PrefixValuePolicy
from kvcore.trace.belady import belady_hits
from kvcore.trace.oracles import DeadFirstOracle, KnownRateOracle, simulate
from kvcore.trace.replay import prepare, replay, to_keys
from kvcore.trace.synth import conversations, documents


@pytest.mark.parametrize("name,factory", [("lru", LRUPolicy),
                                          ("prefix_value", PrefixValuePolicy)])
def test_simulate_matches_engine_replay(name: str, factory) -> None:  # type: ignore[no-untyped-def]
    blocks, _, _ = prepare(documents(300, seed=4))
    keys = to_keys(blocks)
    for capacity in (40, 400):
        engine = replay(keys, capacity, name)
        assert simulate(keys, capacity, factory()) == pytest.approx(engine.hit_ratio, abs=1e-12)


def test_hits_by_use_add_up() -> None:
    rows = [list(r.hash_ids) for r in conversations(300, seed=5, active=8)]
    split: Counter[int] = Counter()
    ratio = simulate(rows, 100, LRUPolicy(), split)
    total = sum(len(r) for r in rows)
    assert sum(split.values()) == round(ratio * total)
    assert 0 not in split  # a block's first use is never a hit
    bsplit: Counter[int] = Counter()
    hits, _ = belady_hits(rows, 100, bsplit)
    assert sum(bsplit.values()) == hits


def test_oracles_beat_lru_and_stay_within_budget() -> None:
    rows = [list(r.hash_ids) for r in documents(600, seed=6)]
    capacity = 300  # simulate asserts the capacity after every request
    lru = simulate(rows, capacity, LRUPolicy())
    assert simulate(rows, capacity, DeadFirstOracle(rows)) > lru
    assert simulate(rows, capacity, KnownRateOracle(rows)) > lru
    hits, total = belady_hits(rows, capacity)
    assert simulate(rows, capacity, DeadFirstOracle(rows)) <= hits / total + 1e-9


def test_oracle_keeps_head_over_tail() -> None:
    policy = DeadFirstOracle([[1, 2, 3]])
    for key, parent in ((1, None), (2, 1), (3, 2)):
        policy.insert(key, 1, parent)
    assert policy.victim() == 3
    assert policy.victim({3}) is None  # 1 and 2 are not leaves
    policy.remove(3)
    assert policy.victim() == 2 and len(policy) == 2
