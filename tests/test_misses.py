"""Why a request missed: each reason produced for real on a real engine (its CPU tier evicting,
a delete, another namespace or tenant) and reported in the request's record and the metrics.

Reasons that need a lower tier (corrupt, not admitted, load failed or late, a tier dropping a
chunk on its own) are tested on a real LMDB tier in plugins/lmdb_store/tests/test_misses.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import pytest

from kvcore.control.prometheus import render_stats
from kvcore.engine import CacheEngine
from kvcore.keys import Namespace
from kvcore.misses import REASONS, ChunkHistory, RequestLog, RequestRecord

CHUNK = 4
PAYLOAD = 256
NS = Namespace("misses-model", layout="test", geometry="L2")
PROMPT = list(range(100, 100 + 4 * CHUNK))


def _store(engine: CacheEngine, namespace: Namespace, tokens: list[int]) -> list[bytes]:
    keys = engine.keys_for(namespace, tokens)
    assert engine.store_buffers(keys, [bytes([i]) * PAYLOAD for i in range(len(keys))]).wait(10)
    return keys


def _ask(engine: CacheEngine, namespace: Namespace, tokens: list[int], rid: str) -> dict:
    engine.lookup(engine.keys_for(namespace, tokens), request_id=rid, tokens=tokens)
    record = engine.requests.get(rid)
    assert record is not None
    return record.as_dict()


@pytest.fixture
def engine(make_engine: Callable[..., CacheEngine]) -> CacheEngine:
    return make_engine(chunk_size=CHUNK, cpu_size=6 * PAYLOAD, eviction="lru")


def test_never_stored(engine: CacheEngine) -> None:
    record = _ask(engine, NS, PROMPT, "r1")
    assert (record["tokens_asked"], record["tokens_hit"], record["tokens_prompt"]) == (16, 0, 16)
    assert record["miss"] == {"reason": "never_stored", "chunk": 0}
    assert engine.metrics.get("request_misses_total", "never_stored") == 1


def test_a_full_hit_has_no_miss_and_counts_nothing(engine: CacheEngine) -> None:
    _store(engine, NS, PROMPT)
    record = _ask(engine, NS, PROMPT, "hit")
    assert record["miss"] is None and record["hit_by_tier"] == {"cpu": 16}
    assert engine.metrics.snapshot()["counters"].get("request_misses_total") is None


def test_evicted_names_the_tier_the_time_and_the_policy(engine: CacheEngine) -> None:
    _store(engine, NS, PROMPT)
    _store(engine, NS, list(range(900, 900 + 4 * CHUNK)))  # 8 chunks into a 6-chunk tier
    record = _ask(engine, NS, PROMPT, "r1")
    miss = record["miss"]
    assert record["tokens_hit"] == 0
    assert (miss["reason"], miss["chunk"], miss["tier"], miss["policy"]) == (
        "evicted", 0, "cpu", "lru")
    assert miss["at"] > 0
    assert engine.metrics.get("request_misses_total", "evicted") == 1


def test_evicted_mid_prompt_reports_the_first_missing_chunk(
        make_engine: Callable[..., CacheEngine]) -> None:
    engine = make_engine(chunk_size=CHUNK, cpu_size=4 * PAYLOAD, eviction="lru")
    keys = _store(engine, NS, PROMPT)
    engine.lookup(keys[:2])  # the first two are now the most recently used
    _store(engine, NS, list(range(900, 900 + 2 * CHUNK)))  # evicts chunks 2 and 3
    record = _ask(engine, NS, PROMPT, "r1")
    assert record["tokens_hit"] == 8 and record["hit_by_tier"] == {"cpu": 8}
    assert (record["miss"]["reason"], record["miss"]["chunk"]) == ("evicted", 2)


def test_deleted(engine: CacheEngine) -> None:
    keys = _store(engine, NS, PROMPT)
    assert engine.delete(keys[1:2]) == 1
    record = _ask(engine, NS, PROMPT, "r1")
    assert (record["miss"]["reason"], record["miss"]["chunk"]) == ("deleted", 1)
    assert record["tokens_hit"] == 4


def test_cleared_namespace_is_deleted(engine: CacheEngine) -> None:
    _store(engine, NS, PROMPT)
    engine.clear(NS)
    assert _ask(engine, NS, PROMPT, "r1")["miss"]["reason"] == "deleted"


@pytest.mark.parametrize("field,value", [("model", "misses-model-v2"), ("layout", "other"),
                                         ("rank", 1), ("tenant", "acme")])
def test_other_namespace_names_the_field_that_differs(engine: CacheEngine, field: str,
                                                      value: object) -> None:
    held = replace(NS, **{field: value})
    _store(engine, held, PROMPT)
    record = _ask(engine, NS, PROMPT, "r1")
    miss = record["miss"]
    assert miss["reason"] == "other_namespace" and miss["tier"] == "cpu"
    assert miss["namespace"] == held.digest.hex()
    assert miss["differs"] == {field: {"asked": getattr(NS, field), "held": value}}
    assert engine.metrics.get("request_misses_total", "other_namespace") == 1


def test_another_tenant_needs_the_prompt_to_be_found(engine: CacheEngine) -> None:
    """Tenants salt the chain of hashes: without the prompt the other tenant's chunk cannot
    be named, and the miss is never_stored."""
    _store(engine, NS.with_tenant("acme"), PROMPT)
    engine.lookup(engine.keys_for(NS, PROMPT), request_id="r1")
    record = engine.requests.get("r1")
    assert record is not None and record.miss is not None
    assert record.miss.reason == "never_stored"


def test_partial_chunk(engine: CacheEngine) -> None:
    record = _ask(engine, NS, PROMPT[:CHUNK - 1], "short")
    assert record["miss"] == {"reason": "partial_chunk", "chunk": 0}
    assert record["tokens_asked"] == 0 and record["tokens_prompt"] == CHUNK - 1


def test_a_repeated_lookup_updates_the_record_and_counts_once(engine: CacheEngine) -> None:
    _ask(engine, NS, PROMPT, "r1")
    _store(engine, NS, PROMPT)
    record = _ask(engine, NS, PROMPT, "r1")
    assert record["miss"] is None and record["tokens_hit"] == 16
    assert engine.metrics.get("request_misses_total", "never_stored") == 1


def test_lookups_without_a_request_id_are_not_recorded(engine: CacheEngine) -> None:
    engine.lookup(engine.keys_for(NS, PROMPT))
    assert engine.requests.recent(10) == []


def test_the_reason_is_logged_at_debug(engine: CacheEngine,
                                       caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="kvcore.engine"):
        _ask(engine, NS, PROMPT, "logged-request")
    lines = [r.getMessage() for r in caplog.records if "logged-request" in r.getMessage()]
    assert lines and "never_stored" in lines[0] and "asked 16 tokens" in lines[0]


def test_prometheus_labels_the_counter_by_reason(engine: CacheEngine) -> None:
    _ask(engine, NS, PROMPT, "r1")
    text = render_stats(engine.stats())
    assert 'kvcore_request_misses_total{reason="never_stored"} 1' in text


def test_every_reason_is_documented() -> None:
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "misses.md").read_text()
    for reason in REASONS:
        assert f"`{reason}`" in doc, reason


def test_history_and_log_are_bounded() -> None:
    history = ChunkHistory(limit=3)
    for i in range(10):
        history.note("cpu", "stored", [bytes([i]) * 24])
    assert len(history) == 3 and history.fates(bytes([0]) * 24) == []
    assert [f.event for f in history.fates(bytes([9]) * 24)] == ["stored"]
    log = RequestLog(limit=2)
    for i in range(5):
        log.put(RequestRecord(f"r{i}", 0.0, "", 0, 0, {}, []))
    assert [r.id for r in log.recent(10)] == ["r4", "r3"] and log.get("r0") is None


def test_off_when_the_sizes_are_zero(make_engine: Callable[..., CacheEngine]) -> None:
    engine = make_engine(chunk_size=CHUNK, cpu_size=6 * PAYLOAD, request_log_size=0,
                         chunk_history_size=0)
    engine.lookup(engine.keys_for(NS, PROMPT), request_id="r1")
    assert engine.requests.get("r1") is None and len(engine.history) == 0
