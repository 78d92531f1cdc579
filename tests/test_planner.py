"""The load-or-recompute planner: its models fitted to measurements, and its choice.

Timings here are given to the models, not measured (tests do not time things): what is
checked is the choice the planner makes from them. The engine-level behaviour (a throttled
real LMDB tier skipped, and the miss reason naming both estimates) is tested in
plugins/lmdb_store/tests/test_misses.py; the figures are in ``kvcore bench planner``.
"""

from __future__ import annotations

import pytest

from kvcore.planner import MARGIN, Planner, PrefillCost, TierCost

CHUNK = 256


def _prefill(planner: Planner, per_token_s: float = 1e-3, attention_s: float = 0.0) -> None:
    """Feed steps computed at ``per_token_s`` per token plus ``attention_s`` per token of
    context attended."""
    for context, tokens in ((0, 512), (512, 1024), (0, 2048), (2048, 256)):
        seconds = per_token_s * tokens + attention_s * tokens * (context + tokens / 2)
        planner.prefill.observe([(context, tokens)], seconds)


def _read(planner: Planner, tier: str, per_chunk_s: float, chunks: int = 4) -> None:
    cost = planner.tier(tier)
    cost.started(chunks)
    cost.finished(chunks, per_chunk_s * chunks)


def test_prefill_fit_recovers_both_terms() -> None:
    prefill = PrefillCost()
    planner = Planner()
    planner.prefill = prefill
    _prefill(planner, per_token_s=2e-3, attention_s=1e-7)
    expected = 2e-3 * 1000 + 1e-7 * 1000 * (4000 + 500)
    assert prefill.seconds(4000, 1000) == pytest.approx(expected, rel=1e-6)


def test_decode_steps_do_not_feed_the_prefill_model() -> None:
    prefill = PrefillCost()
    for _ in range(10):
        prefill.observe([(1000, 1), (2000, 1)], 0.01)
    assert not prefill.known


def test_everything_is_claimed_before_the_prefill_is_measured() -> None:
    planner = Planner()
    _read(planner, "lmdb", per_chunk_s=100.0)
    assert planner.plan(["lmdb"] * 4, CHUNK, 4 * CHUNK + 1).claim == 4


def test_a_tier_never_read_is_claimed_to_learn_its_cost() -> None:
    planner = Planner()
    _prefill(planner)
    assert planner.plan(["cpu", "redis"], CHUNK, 2 * CHUNK).claim == 2


def test_a_fast_tier_is_claimed_a_slow_one_skipped() -> None:
    planner = Planner()
    _prefill(planner, per_token_s=1e-3)  # 0.256 s to recompute a chunk
    _read(planner, "lmdb", per_chunk_s=0.01)
    assert planner.plan(["lmdb"] * 4, CHUNK, 4 * CHUNK + 1).claim == 4
    _read(planner, "redis", per_chunk_s=2.0)
    _read(planner, "redis", per_chunk_s=2.0)
    plan = planner.plan(["redis"] * 4, CHUNK, 4 * CHUNK + 1)
    assert (plan.claim, plan.found, plan.tier) == (0, 4, "redis")
    assert plan.load_s == pytest.approx(4 * 2.0, rel=0.01)
    assert plan.recompute_s == pytest.approx(4 * 0.256, rel=0.01)


def test_memory_chunks_stay_claimed_and_a_slow_tail_is_recomputed() -> None:
    planner = Planner()
    _prefill(planner)
    _read(planner, "redis", per_chunk_s=5.0)
    plan = planner.plan(["cpu", "cpu", "redis", "redis"], CHUNK, 4 * CHUNK + 1)
    assert plan.claim == 2 and plan.tier == "redis"


def test_attention_makes_late_chunks_worth_loading() -> None:
    """Recomputing a chunk costs more the longer the context before it: a load slower than
    recomputing the first chunk is still worth it for a long prompt's chunks."""
    planner = Planner()
    _prefill(planner, per_token_s=1e-4, attention_s=1e-7)
    _read(planner, "lmdb", per_chunk_s=0.1)
    short = planner.plan(["lmdb"] * 2, CHUNK, 2 * CHUNK)
    long = planner.plan(["lmdb"] * 64, CHUNK, 64 * CHUNK)
    assert short.claim == 0 and long.claim == 64


def test_the_moving_average_follows_a_tier_that_slows_down() -> None:
    planner = Planner()
    _prefill(planner)
    _read(planner, "lmdb", per_chunk_s=0.01)
    assert planner.plan(["lmdb"] * 4, CHUNK, 4 * CHUNK).claim == 4
    _read(planner, "lmdb", per_chunk_s=10.0)
    assert planner.plan(["lmdb"] * 4, CHUNK, 4 * CHUNK).claim == 0


def test_backlog_counts_reads_in_flight() -> None:
    planner = Planner()
    _prefill(planner)  # 0.256 s a chunk
    _read(planner, "lmdb", per_chunk_s=0.1)
    assert planner.plan(["lmdb"] * 4, CHUNK, 4 * CHUNK).claim == 4
    planner.tier("lmdb").started(40)  # a prefetch of 40 chunks is still reading
    assert planner.plan(["lmdb"] * 4, CHUNK, 4 * CHUNK).claim == 0
    planner.tier("lmdb").finished(40, 4.0)
    assert planner.tier("lmdb").in_flight == 0


def test_close_calls_keep_the_load() -> None:
    """Within MARGIN, loading wins (a recompute also costs the engine's compute)."""
    planner = Planner()
    _prefill(planner)
    _read(planner, "lmdb", per_chunk_s=0.256 * (MARGIN - 0.05))
    assert planner.plan(["lmdb"] * 4, CHUNK, 4 * CHUNK).claim == 4


@pytest.mark.parametrize("mode,claim", [("load", 4), ("recompute", 0)])
def test_fixed_modes(mode: str, claim: int) -> None:
    planner = Planner(mode)
    _prefill(planner)
    _read(planner, "lmdb", per_chunk_s=0.01)
    assert planner.plan(["lmdb"] * 4, CHUNK, 4 * CHUNK).claim == claim


def test_unknown_mode() -> None:
    with pytest.raises(ValueError, match="unknown planner mode 'sometimes'"):
        Planner("sometimes")


def test_tier_cost_without_reads_is_unknown() -> None:
    assert TierCost().load_s(4) is None
