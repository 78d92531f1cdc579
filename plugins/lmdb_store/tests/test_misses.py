"""Miss reasons that need a lower tier, each produced for real on a real LMDB tier: a chunk
evicted from both tiers, one never written below (admission), one that fails verification, a
load that fails and one that runs late behind a throttled LMDB read."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from kvcore.config import load_settings
from kvcore.engine import CacheEngine
from kvcore.keys import Namespace
from kvcore.plugins import PluginRegistry
from kvcore_lmdb import files

CHUNK = 4
PAYLOAD = 64 * 1024
NS = Namespace("lmdb-misses")
PROMPT = list(range(4 * CHUNK))


@pytest.fixture
def open_engine(tmp_path, kvcore_env) -> Iterator:
    made: list[CacheEngine] = []

    def make(**settings: object) -> CacheEngine:
        kvcore_env.setenv("KVCORE_LMDB_PATH", str(tmp_path / "lmdb"))
        kvcore_env.setenv("KVCORE_LMDB_SIZE", str(settings.pop("lmdb_size", "64MiB")))
        engine = CacheEngine(load_settings(**{"tiers": ["cpu", "lmdb"], "chunk_size": CHUNK,
                                              "cpu_size": 64 * PAYLOAD, "eviction": "lru",
                                              **settings}),
                             registry=PluginRegistry().load(["lmdb"]))
        made.append(engine)
        return engine

    yield make
    for engine in reversed(made):
        engine.close()


def _store(engine: CacheEngine, tokens: list[int]) -> list[bytes]:
    keys = engine.keys_for(NS, tokens)
    payloads = [bytes([i + 1]) * PAYLOAD for i in range(len(keys))]
    assert engine.store_buffers(keys, payloads).wait(10) == len(keys)
    assert engine.flush(30)
    return keys


def _miss(engine: CacheEngine, rid: str, tokens: list[int] = PROMPT) -> dict:
    engine.lookup(engine.keys_for(NS, tokens), prefetch=False, request_id=rid, tokens=tokens)
    record = engine.requests.get(rid)
    assert record is not None and record.miss is not None
    return record.miss.as_dict()


def test_evicted_from_every_tier_names_the_last(open_engine) -> None:
    """Both tiers evict by their policy: the reason names the tier that let it go last."""
    engine = open_engine(cpu_size=4 * PAYLOAD, lmdb_size=str(6 * (PAYLOAD + 4096)))
    _store(engine, PROMPT)
    for start in range(1000, 1000 + 3 * 4 * CHUNK, 4 * CHUNK):  # 12 more chunks: both evict
        _store(engine, list(range(start, start + 4 * CHUNK)))
    assert engine.lower[0].contains(engine.keys_for(NS, PROMPT)) == [False] * 4
    miss = _miss(engine, "r1")
    assert (miss["reason"], miss["tier"], miss["policy"]) == ("evicted", "lmdb", "lru")
    assert [(t["tier"], t["event"]) for t in miss["tiers"]] == [("cpu", "evicted"),
                                                                 ("lmdb", "evicted")]


def test_found_below_memory_is_a_hit_by_that_tier(open_engine) -> None:
    engine = open_engine()
    _store(engine, PROMPT)
    engine.clear(tier="cpu")
    engine.lookup(engine.keys_for(NS, PROMPT), prefetch=False, request_id="r1")
    record = engine.requests.get("r1")
    assert record is not None and record.miss is None
    assert record.hit_by_tier == {"lmdb": 16}


def test_not_admitted_below_memory(open_engine) -> None:
    engine = open_engine(lower_admission="reused")
    _store(engine, PROMPT)  # asked never, stored once: memory only
    engine.clear(tier="cpu")
    miss = _miss(engine, "r1")
    assert miss["reason"] == "deleted"  # the clear of memory is what removed it ...
    engine.history.note("cpu", "evicted", engine.keys_for(NS, PROMPT), policy="lru")
    miss = _miss(engine, "r2")  # ... had memory evicted it instead, admission is the reason
    assert (miss["reason"], miss["tier"]) == ("not_admitted", "lmdb")
    assert miss["policy"] == "KVCORE_LOWER_ADMISSION=reused"


def test_not_admitted_after_a_real_eviction(open_engine) -> None:
    engine = open_engine(lower_admission="reused", cpu_size=4 * PAYLOAD)
    _store(engine, PROMPT)
    _store(engine, list(range(1000, 1000 + 4 * CHUNK)))  # evicts the prompt from memory
    miss = _miss(engine, "r1")
    assert (miss["reason"], miss["tier"], miss["chunk"]) == ("not_admitted", "lmdb", 0)


def _flip(engine: CacheEngine, key: bytes, offset: int = 5000) -> None:
    tier = engine.lower[0].tier
    name = next(n for n, _ in files.iter_files(tier.chunks_dir) if n.startswith(key.hex()))
    path = files.file_path(tier.chunks_dir, name)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def test_corrupt_fails_the_load_then_is_the_reason(open_engine) -> None:
    engine = open_engine()
    keys = _store(engine, PROMPT)
    engine.clear(tier="cpu")
    _flip(engine, keys[1])
    engine.lookup(keys, prefetch=False, request_id="r1", tokens=PROMPT)
    with engine.acquire(keys, request_id="r1") as lease:
        assert len(lease) == 1
    record = engine.requests.get("r1")
    assert record is not None and record.load is not None
    assert record.miss is None  # the lookup found all four
    load = record.load["miss"]
    assert (load["reason"], load["chunk"], load["tier"]) == ("load_failed", 1, "lmdb")
    assert load["cause"] == "failed verification"
    assert engine.metrics.get("request_misses_total", "load_failed") == 1
    miss = _miss(engine, "r2")  # asked again: removed as corrupt
    assert (miss["reason"], miss["chunk"], miss["tier"]) == ("corrupt", 1, "lmdb")


def test_a_truncated_file_is_corrupt_as_the_tier_reports_it(open_engine) -> None:
    engine = open_engine()
    keys = _store(engine, PROMPT)
    engine.clear(tier="cpu")
    tier = engine.lower[0].tier
    name = next(n for n, _ in files.iter_files(tier.chunks_dir) if n.startswith(keys[0].hex()))
    path = files.file_path(tier.chunks_dir, name)
    path.write_bytes(path.read_bytes()[:100])
    with engine.acquire(keys) as lease:
        assert len(lease) == 0
    miss = _miss(engine, "r1")
    assert (miss["reason"], miss["chunk"], miss["tier"]) == ("corrupt", 0, "lmdb")


def test_load_late_behind_a_throttled_tier(open_engine) -> None:
    """LMDB reads slowed past KVCORE_TIER_TIMEOUT_S: found at lookup, late at load."""
    engine = open_engine(tier_timeout_s=0.2)
    keys = _store(engine, PROMPT)
    engine.clear(tier="cpu")
    tier = engine.lower[0].tier
    real_get = tier.get
    release = threading.Event()

    def slow_get(wanted):  # a real LMDB read, delayed
        release.wait(2.0)
        return real_get(wanted)

    tier.get = slow_get
    try:
        engine.lookup(keys, prefetch=False, request_id="r1")
        started = time.monotonic()
        with engine.acquire(keys, request_id="r1") as lease:
            assert len(lease) == 0
        assert time.monotonic() - started < 1.5
    finally:
        release.set()
        tier.get = real_get
    record = engine.requests.get("r1")
    assert record is not None and record.load is not None
    load = record.load["miss"]
    assert (load["reason"], load["chunk"], load["tier"]) == ("load_late", 0, "lmdb")
    assert "KVCORE_TIER_TIMEOUT_S" in load["cause"]
    assert engine.metrics.get("request_misses_total", "load_late") == 1


def test_a_chunk_the_tier_drops_unannounced_is_evicted_without_a_policy(open_engine) -> None:
    """Stored below, gone with no event (another process, or Redis evicting on its own)."""
    engine = open_engine()
    keys = _store(engine, PROMPT)
    engine.memory.delete(keys)  # the memory tier's own eviction path
    engine.lower[0].tier._notify = None  # this tier now drops chunks without telling
    engine.lower[0].tier.delete(keys)
    miss = _miss(engine, "r1")
    assert miss["reason"] == "evicted" and miss["tier"] == "lmdb"
    assert miss["at"] is None and miss["policy"] == ""


def test_planner_skips_a_throttled_tier_and_says_why(open_engine) -> None:
    """A real LMDB read slowed to 0.1 s a chunk, an engine that computes a chunk in 4 ms (as
    the vLLM connector reports its forward steps): the chunks are left to recompute."""
    engine = open_engine()
    keys = _store(engine, PROMPT)
    engine.clear(tier="cpu")
    for context, tokens in ((0, 64), (64, 128), (0, 256)):
        engine.observe_prefill([(context, tokens)], 1e-3 * tokens)
    tier = engine.lower[0].tier
    real_get = tier.get

    def slow_get(wanted):  # a real LMDB read, throttled
        time.sleep(0.1 * len(wanted))
        return real_get(wanted)

    tier.get = slow_get
    assert engine.lookup(keys).chunks == 4  # its first read: claimed, and measured
    assert engine.flush(10)
    engine.pipeline.wait_inflight(keys, 5.0)
    engine.clear(tier="cpu")
    found = engine.lookup(keys, request_id="r1", tokens=PROMPT)
    assert (found.chunks, found.found) == (0, 4)
    record = engine.requests.get("r1")
    assert record is not None and record.miss is not None
    miss = record.miss.as_dict()
    assert (miss["reason"], miss["chunk"], miss["tier"]) == ("planner_skipped", 0, "lmdb")
    assert miss["load_s"] > 10 * miss["recompute_s"] > 0
    assert engine.metrics.get("request_misses_total", "planner_skipped") == 1
    tier.get = real_get
    engine.planner.mode = "load"
    assert engine.lookup(keys).chunks == 4
