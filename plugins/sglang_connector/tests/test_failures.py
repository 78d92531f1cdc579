"""A failing tier, or a failure inside the backend, is a miss, never an exception into SGLang."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from sglang_support import (
    DYNAMIC,
    PAGE,
    fill_random,
    make_mha_host_pool,
    page_keys,
    small_engine,
    storage_config,
)

from kvcore.interfaces import Tier, TierUsage
from kvcore_sglang.backend import KVCoreHiCacheStorage


class RaisingTier(Tier):
    """A lower tier whose every operation fails."""

    name = "broken"

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        raise ConnectionError("store unreachable")

    def get(self, keys):
        raise ConnectionError("store unreachable")

    def put(self, items):
        raise ConnectionError("store unreachable")

    def delete(self, keys: Sequence[bytes]) -> int:
        raise ConnectionError("store unreachable")

    def usage(self) -> TierUsage:
        raise ConnectionError("store unreachable")


def _backend(engine, pool) -> KVCoreHiCacheStorage:
    backend = KVCoreHiCacheStorage(storage_config(dict(DYNAMIC)), {}, engine=engine)
    backend.register_mem_pool_host(pool)
    return backend


def test_raising_lower_tier_gives_misses() -> None:
    engine = small_engine(RaisingTier())
    try:
        pool = make_mha_host_pool("page_first")
        fill_random(pool, seed=4)
        backend = _backend(engine, pool)
        keys = page_keys("broken", 2)
        idx = pool.alloc(2 * PAGE)
        assert backend.batch_set_v1(keys, idx) == [True, True]  # memory tier took them
        assert engine.flush(5.0)  # write-behind to the broken tier failed quietly
        assert backend.batch_exists(keys) == 2

        engine.memory.delete(list(engine.memory.iter_keys()))
        assert backend.batch_exists(keys) == 0  # only the broken tier is left to ask
        assert backend.exists(keys[0]) is False
        assert backend.batch_get_v1(keys, pool.alloc(2 * PAGE)) == [False, False]
        assert backend.batch_get(keys, [pool.get_dummy_flat_data_page()] * 2) == [None, None]
        assert backend.get(keys[0], pool.get_dummy_flat_data_page()) is None
        backend.clear()  # the broken tier's delete fails: still no exception
        assert engine.metrics.get("tier_errors_total", "broken") >= 3  # counted, not raised
    finally:
        engine.close()


@pytest.mark.parametrize("method", ["acquire", "lookup", "store"])
def test_engine_failure_inside_backend_gives_misses(engine, monkeypatch, method) -> None:
    pool = make_mha_host_pool("page_first")
    backend = _backend(engine, pool)
    keys = page_keys("x", 2)
    idx = pool.alloc(2 * PAGE)

    def boom(*args, **kwargs):
        raise RuntimeError(f"{method} exploded")

    monkeypatch.setattr(engine, method, boom)
    assert backend.batch_set_v1(keys, idx) == ([False, False] if method == "store"
                                               else [True, True])
    assert backend.batch_set(keys, [pool.get_data_page(0)] * 2) is (method != "store")
    assert backend.batch_exists(keys) == (0 if method == "lookup" else
                                          (0 if method == "store" else 2))
    expected = [False, False] if method in ("acquire", "store") else [True, True]
    assert backend.batch_get_v1(keys, pool.alloc(2 * PAGE)) == expected
    assert backend.exists(keys[0]) is (method not in ("lookup", "store"))


def test_bad_host_indices_and_unregistered_pool_are_misses(engine) -> None:
    backend = KVCoreHiCacheStorage(storage_config(dict(DYNAMIC)), {}, engine=engine)
    assert backend.batch_set_v1(["a"], make_mha_host_pool("page_first").alloc(PAGE)) == [False]
    pool = make_mha_host_pool("page_first")
    backend.register_mem_pool_host(pool)
    short = pool.alloc(PAGE)[:2]  # fewer indices than a page
    assert backend.batch_set_v1(["a"], short) == [False]
    assert backend.batch_get_v1(["a"], short) == [False]


def test_full_memory_tier_refuses_a_set() -> None:
    pool = make_mha_host_pool("page_first")
    page = pool.get_data_page(0).numel() * pool.dtype.itemsize
    engine = small_engine(cpu_bytes=page - 1)  # not even one page fits
    try:
        backend = _backend(engine, pool)
        assert backend.batch_set_v1(["big"], pool.alloc(PAGE)) == [False]
        assert backend.batch_exists(["big"]) == 0
    finally:
        engine.close()
