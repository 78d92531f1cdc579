"""Cache engine: properties under random operations, concurrency, lower-tier failures."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcore.config import load_settings
from kvcore.engine import CacheEngine
from kvcore.eviction.lru import LRUPolicy
from kvcore.interfaces import Tier, TierUsage
from kvcore.keys import Namespace, chunk_keys
from kvcore.tiers.cpu import CpuTier

CHUNK = 4
PAYLOAD = 256

operations = st.lists(
    st.tuples(st.sampled_from(["store", "lookup", "retrieve", "delete", "pin", "unpin"]),
              st.integers(0, 7), st.integers(1, 6)),
    min_size=1, max_size=40,
)


def payload_for(key: bytes) -> bytes:
    return (key * (PAYLOAD // len(key) + 1))[:PAYLOAD]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations, budget_chunks=st.integers(1, 12),
       policy=st.sampled_from(["lru", "prefix_lru"]))
def test_engine_properties(ops: list[tuple[str, int, int]], budget_chunks: int,
                           policy: str) -> None:
    engine = CacheEngine(load_settings(chunk_size=CHUNK, cpu_size=budget_chunks * PAYLOAD,
                                       eviction=policy))
    try:
        ns = Namespace("prop")
        prompts = [list(range(p * 1000, p * 1000 + 6 * CHUNK)) for p in range(8)]
        for op, prompt, length in ops:
            keys = chunk_keys(ns, prompts[prompt][: length * CHUNK], CHUNK)
            if op == "store":
                engine.store_buffers(keys, [payload_for(k) for k in keys]).wait(10)
            elif op == "lookup":
                found = engine.lookup(keys).chunks
                with engine.acquire(keys) as lease:
                    # never more than retrieve can deliver, and exactly the bytes stored
                    assert len(lease) >= found
                    for key, view in zip(lease.keys, lease.views):
                        assert bytes(view) == payload_for(key)
            elif op == "retrieve":
                dests = [bytearray(PAYLOAD) for _ in keys]
                n = engine.retrieve(keys, dests)
                for key, dest in zip(keys[:n], dests[:n]):
                    assert bytes(dest) == payload_for(key)
            elif op == "delete":
                engine.delete(keys)
                assert engine.lookup(keys).chunks == 0 or not keys
            elif op == "pin":
                engine.pin(keys)
            elif op == "unpin":
                engine.unpin(keys)
            usage = engine.memory.usage()
            assert usage.used_bytes <= usage.budget_bytes
    finally:
        engine.close()


def test_concurrent_stores_and_retrieves_lose_and_corrupt_nothing() -> None:
    engine = CacheEngine(load_settings(chunk_size=CHUNK, cpu_size="64MiB"))
    ns = Namespace("threads")
    prompts = [list(range(t * 10_000, t * 10_000 + 32 * CHUNK)) for t in range(6)]
    expected = {}
    for prompt in prompts:
        for key in chunk_keys(ns, prompt, CHUNK):
            expected[key] = os.urandom(PAYLOAD)
    errors: list[str] = []

    def writer(prompt: list[int]) -> None:
        keys = chunk_keys(ns, prompt, CHUNK)
        for n in range(1, len(keys) + 1, 5):
            engine.store_buffers(keys[:n], [expected[k] for k in keys[:n]]).wait(10)
        engine.store_buffers(keys, [expected[k] for k in keys]).wait(10)

    def reader(prompt: list[int]) -> None:
        keys = chunk_keys(ns, prompt, CHUNK)
        for _ in range(50):
            with engine.acquire(keys) as lease:
                for key, view in zip(lease.keys, lease.views):
                    if bytes(view) != expected[key]:
                        errors.append(key.hex())

    threads = [threading.Thread(target=writer, args=(p,)) for p in prompts]
    threads += [threading.Thread(target=reader, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for prompt in prompts:
        keys = chunk_keys(ns, prompt, CHUNK)
        assert engine.lookup(keys).chunks == len(keys)  # nothing lost
        dests = [np.zeros(PAYLOAD, np.uint8) for _ in keys]
        assert engine.retrieve(keys, dests) == len(keys)
        assert all(d.tobytes() == expected[k] for k, d in zip(keys, dests))
    engine.close()


class BrokenTier(Tier):
    """A lower tier that fails in every way a remote store can."""

    name = "broken"

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def _act(self) -> None:
        if self.mode == "raise":
            raise ConnectionError("store unreachable")
        time.sleep(5)

    def contains(self, keys):  # type: ignore[no-untyped-def]
        self._act()
        return [True] * len(keys)

    def get(self, keys):  # type: ignore[no-untyped-def]
        self._act()
        return [b"x"] * len(keys)

    def put(self, items):  # type: ignore[no-untyped-def]
        self._act()
        return [True] * len(items)

    def delete(self, keys):  # type: ignore[no-untyped-def]
        self._act()
        return 0

    def usage(self) -> TierUsage:
        return TierUsage(0, 0, 0)


def test_failing_and_hanging_lower_tiers_become_misses() -> None:
    for mode in ("raise", "hang"):
        settings_ = load_settings(chunk_size=CHUNK, tier_timeout_s=0.2)
        engine = CacheEngine(settings_, tiers=[CpuTier(1 << 20, LRUPolicy()), BrokenTier(mode)])
        try:
            keys = chunk_keys(Namespace("f"), range(4 * CHUNK), CHUNK)
            started = time.monotonic()
            assert engine.lookup(keys).chunks == 0
            assert engine.store_buffers(keys[:2], [b"a" * 10] * 2).wait(5) == 2
            with engine.acquire(keys) as lease:
                assert len(lease) == 2
            assert time.monotonic() - started < 4
            assert engine.metrics.get("tier_errors_total", "broken") >= 1
        finally:
            engine.close()


def test_lookup_reports_tiers_and_prefetches_into_cpu() -> None:
    from kvcore_example_tier import DictTier  # the documented example plugin

    lower = DictTier(1 << 20, LRUPolicy())
    lower.name = "example"
    engine = CacheEngine(load_settings(chunk_size=CHUNK, tiers=["cpu", "example"]),
                         tiers=[CpuTier(1 << 20, LRUPolicy()), lower])
    try:
        keys = chunk_keys(Namespace("pf"), range(6 * CHUNK), CHUNK)
        payloads = [os.urandom(64) for _ in keys]
        engine.store_buffers(keys, payloads).wait(5)
        assert engine.flush(10)
        engine.clear(tier="cpu")
        engine.store_buffers(keys[:2], payloads[:2]).wait(5)
        result = engine.lookup(keys)
        assert result.chunks == 6 and result.by_tier == {"cpu": 2, "example": 4}
        deadline = time.monotonic() + 5
        while not all(engine.memory.contains(keys)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(engine.memory.contains(keys))
        assert engine.metrics.get("promoted_chunks_total", "example") == 4
    finally:
        engine.close()


def test_store_queue_full_drops_instead_of_blocking() -> None:
    engine = CacheEngine(load_settings(chunk_size=CHUNK, store_queue_size=1))
    release = threading.Event()

    class SlowSource:
        def chunk_nbytes(self) -> int:
            return 8

        def fill(self, indices, dests):  # type: ignore[no-untyped-def]
            release.wait(5)
            for d in dests:
                d[:] = 1

    ns = Namespace("q")
    handles = [engine.store(chunk_keys(ns, range(i * 100, i * 100 + CHUNK), CHUNK), SlowSource())
               for i in range(5)]
    release.set()
    results = [h.wait(5) for h in handles]
    assert results.count(0) >= 1 and engine.metrics.get("stores_dropped_total") >= 1
    engine.close()


def test_clear_by_namespace() -> None:
    engine = CacheEngine(load_settings(chunk_size=CHUNK))
    a, b = Namespace("m", tenant="a"), Namespace("m", tenant="b")
    ka, kb = engine.keys_for(a, range(8)), engine.keys_for(b, range(8))
    engine.store_buffers(ka, [b"1"] * 2).wait(5)
    engine.store_buffers(kb, [b"2"] * 2).wait(5)
    assert engine.clear(a) == 2
    assert engine.lookup(ka).chunks == 0 and engine.lookup(kb).chunks == 2
    engine.close()


class _HangingUsageTier(BrokenTier):
    def usage(self) -> TierUsage:
        time.sleep(5)
        return TierUsage(0, 0, 0)


def test_stats_is_bounded_by_the_tier_timeout() -> None:
    """Review finding (issue 16): stats() took 8 s with Redis paused."""
    engine = CacheEngine(load_settings(chunk_size=CHUNK, tier_timeout_s=0.2),
                         tiers=[CpuTier(1 << 20, LRUPolicy()), _HangingUsageTier("raise")])
    try:
        started = time.monotonic()
        stats = engine.stats()
        assert time.monotonic() - started < 2
        assert "error" in stats["tiers"]["broken"]
        assert stats["tiers"]["cpu"]["chunks"] == 0
    finally:
        engine.close()


def test_failed_construction_closes_the_tiers_already_built() -> None:
    """Review finding (issue 16): a tier that fails to build left the ones before it open."""
    from kvcore.hookspecs import hookimpl
    from kvcore.plugins import PluginRegistry

    closed: list[str] = []

    class Recording(BrokenTier):
        def close(self) -> None:
            closed.append(self.name)

    class Plugin:
        @staticmethod
        @hookimpl
        def kvcore_register_tiers(register) -> None:  # type: ignore[no-untyped-def]
            register("recording", lambda context: Recording("raise"))

            def fail(context):  # type: ignore[no-untyped-def]
                raise OSError("cannot open the store")

            register("failing", fail)

    registry = PluginRegistry().load()
    registry.register_module(Plugin(), name="test-tiers")
    import pytest

    with pytest.raises(OSError, match="cannot open the store"):
        CacheEngine(load_settings(tiers=["cpu", "recording", "failing"]), registry=registry)
    assert closed == ["recording"]


def test_infinite_or_nan_tier_timeout_is_a_config_error() -> None:
    """Review finding (issue 16): KVCORE_TIER_TIMEOUT_S=inf silently disabled every lower tier."""
    import pytest

    from kvcore.config import ConfigError

    for value in ("inf", "nan", "-1"):
        with pytest.raises(ConfigError, match="KVCORE_TIER_TIMEOUT_S"):
            load_settings(tier_timeout_s=value)


def test_log_level_takes_effect_in_a_bare_process() -> None:
    """Review finding (issue 16): KVCORE_LOG_LEVEL=DEBUG printed nothing (no handler); and a
    CPU budget smaller than one chunk stored nothing without a word."""
    import subprocess
    import sys

    script = ("from kvcore.engine import CacheEngine\n"
              "from kvcore.config import load_settings\n"
              "e = CacheEngine(load_settings(chunk_size=4, cpu_size=100))\n"
              "e.store_buffers([b'k' * 24], [b'x' * 1000]).wait(5)\n"
              "e.close()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCORE_")}
    quiet = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                           text=True, timeout=60)
    loud = subprocess.run([sys.executable, "-c", script], env={**env, "KVCORE_LOG_LEVEL": "INFO"},
                          capture_output=True, text=True, timeout=60)
    assert quiet.returncode == loud.returncode == 0
    assert "kvcore engine: tiers cpu" not in quiet.stderr
    assert "kvcore engine: tiers cpu" in loud.stderr
    assert quiet.stderr.count("KVCORE_CPU_SIZE=100 bytes is smaller than one chunk") == 1


def test_background_threads_yield_the_cpu() -> None:
    """Stores run at KVCORE_BACKGROUND_NICE above the caller's nice value (0: the same)."""
    from kvcore.background import thread_nice

    seen: dict[int, int] = {}

    class Recording:
        def chunk_nbytes(self) -> int:
            return 16

        def fill(self, indices, dests) -> None:  # type: ignore[no-untyped-def]
            seen[len(seen)] = thread_nice()
            for dest in dests:
                dest[:] = 1

    mine = thread_nice()
    for nice in (10, 0):
        engine = CacheEngine(load_settings(chunk_size=CHUNK, background_nice=nice))
        try:
            keys = chunk_keys(Namespace(f"nice{nice}"), range(CHUNK), CHUNK)
            assert engine.store(keys, Recording()).wait(5) == 1
        finally:
            engine.close()
    assert seen == {0: min(19, mine + 10), 1: mine}


def test_lowered_priority_does_not_compound() -> None:
    """A pool started from a lowered thread (a tier call from the store thread) stays at the
    process's nice + KVCORE_BACKGROUND_NICE, not twice that."""
    import threading

    from kvcore.background import lower_priority, thread_nice

    base = thread_nice()
    seen: list[int] = []

    def inner() -> None:
        lower_priority(5)
        seen.append(thread_nice())

    def outer() -> None:
        lower_priority(5)
        seen.append(thread_nice())
        child = threading.Thread(target=inner)
        child.start()
        child.join()

    thread = threading.Thread(target=outer)
    thread.start()
    thread.join()
    assert seen == [min(19, base + 5), min(19, base + 5)]


def test_a_failed_promotion_leaves_no_chunk_held(monkeypatch: pytest.MonkeyPatch) -> None:
    """If reading a lower tier raises inside acquire, the chunks it already held from memory
    are released (they stay evictable) and the error reaches the caller once."""
    from kvcore.eviction.lru import LRUPolicy
    from kvcore.tiers.cpu import CpuTier

    memory, lower = CpuTier(1 << 20, LRUPolicy()), CpuTier(1 << 20, LRUPolicy())
    with CacheEngine(load_settings(chunk_size=CHUNK), tiers=[memory, lower]) as engine:
        keys = chunk_keys(Namespace("held"), range(2 * CHUNK), CHUNK)
        memory.put_one(keys[0], [b"a" * 64])
        lower.put_one(keys[1], [b"b" * 64])

        def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
            raise MemoryError("no pinned memory left")

        monkeypatch.setattr(engine.stack, "promote", broken)
        with pytest.raises(MemoryError):
            engine.acquire(keys)
        assert memory.delete([keys[0]]) == 1  # not held any more
