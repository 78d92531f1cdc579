"""batch_exists and friends as SGLang defines them, partly driven by SGLang's controller code."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from sglang_support import (
    DYNAMIC,
    PAGE,
    fill_random,
    make_mha_host_pool,
    page_bytes,
    page_keys,
    storage_config,
)

from kvcore_sglang.backend import KVCoreHiCacheStorage


def _backend(engine, pool=None, **extra) -> KVCoreHiCacheStorage:
    backend = KVCoreHiCacheStorage(storage_config({**DYNAMIC, **extra}), {}, engine=engine)
    if pool is not None:
        backend.register_mem_pool_host(pool)
    return backend


def test_batch_exists_counts_the_leading_run_of_hits(engine) -> None:
    pool = make_mha_host_pool("page_first")
    backend = _backend(engine, pool)
    keys = page_keys("lead", 6)
    idx = pool.alloc(6 * PAGE)
    # store pages 0, 1, 2 and 4, 5: page 3 is a hole
    assert backend.batch_set_v1(keys[:3], idx[: 3 * PAGE]) == [True] * 3
    assert backend.batch_set_v1(keys[4:], idx[4 * PAGE :]) == [True] * 2
    assert backend.batch_exists(keys) == 3
    assert backend.batch_exists(keys[4:]) == 2
    assert backend.batch_exists(keys[3:]) == 0
    assert backend.batch_exists([]) == 0
    assert [backend.exists(k) for k in keys] == [True, True, True, False, True, True]


def test_batch_get_v1_hits_are_per_page_after_a_hole(engine) -> None:
    pool = make_mha_host_pool("page_first")
    fill_random(pool, seed=21)
    backend = _backend(engine, pool)
    keys = page_keys("hole", 3)
    src = pool.alloc(3 * PAGE)
    assert backend.batch_set_v1([keys[0], keys[2]], torch.cat([src[:PAGE], src[2 * PAGE :]])) \
        == [True, True]
    dst = pool.alloc(3 * PAGE)
    assert backend.batch_get_v1(keys, dst) == [True, False, True]
    assert page_bytes(pool, int(dst[2 * PAGE])) == page_bytes(pool, int(src[2 * PAGE]))


def test_set_of_an_existing_page_succeeds_and_keeps_the_first_bytes(engine) -> None:
    pool = make_mha_host_pool("page_first")
    fill_random(pool, seed=2)
    backend = _backend(engine, pool)
    a, b = pool.alloc(PAGE), pool.alloc(PAGE)
    assert backend.batch_set_v1(["same"], a) == [True]
    assert backend.batch_set_v1(["same"], b) == [True]  # already stored: success, no rewrite
    out = pool.alloc(PAGE)
    assert backend.batch_get_v1(["same"], out) == [True]
    assert page_bytes(pool, int(out[0])) == page_bytes(pool, int(a[0]))


def test_sglang_controller_backup_query_and_prefetch_paths(engine) -> None:
    """SGLang's own controller methods (hashing tokens into page keys, the zero-copy set,
    the storage hit query and the zero-copy get) run against the kvcore backend."""
    from sglang.srt.managers.cache_controller import HiCacheController
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageExtraInfo
    from sglang.srt.mem_cache.utils import get_storage_hash_str

    pool = make_mha_host_pool("page_first")
    fill_random(pool, seed=9)
    backend = _backend(engine, pool)
    controller = SimpleNamespace(page_size=PAGE, storage_backend=backend, mem_pool_host=pool,
                                 storage_host_pool=pool)

    tokens = list(range(100, 100 + 5 * PAGE))
    hashes = get_storage_hash_str(tokens, None, page_size=PAGE)
    assert len(hashes) == 5
    src = pool.alloc(5 * PAGE)
    info = HiCacheStorageExtraInfo(prefix_keys=[])
    assert HiCacheController._page_set_zero_copy(controller, hashes[:3], src[: 3 * PAGE], info)

    operation = SimpleNamespace(last_hash=None, token_ids=tokens, prefix_keys=None,
                                all_hash_values=None, request_id="r1")
    hit_hashes, hit_tokens = HiCacheController._storage_hit_query(controller, operation)
    assert hit_hashes == hashes[:3] and hit_tokens == 3 * PAGE

    dst = pool.alloc(3 * PAGE)
    loaded = HiCacheController._page_get_zero_copy(controller, operation, hit_hashes, dst, info)
    assert loaded == 3
    for i in range(3):
        assert page_bytes(pool, int(dst[i * PAGE])) == page_bytes(pool, int(src[i * PAGE]))


def test_generic_controller_paths(engine) -> None:
    """SGLang's deprecated generic page set/get (flat data pages) against kvcore."""
    from sglang.srt.managers.cache_controller import HiCacheController

    pool = make_mha_host_pool("page_first")
    fill_random(pool, seed=13)
    backend = _backend(engine, pool, interface_v1=0)
    controller = SimpleNamespace(page_size=PAGE, storage_backend=backend, mem_pool_host=pool,
                                 storage_host_pool=pool)
    keys = page_keys("generic", 2)
    src = pool.alloc(2 * PAGE)
    assert HiCacheController._generic_page_set(controller, keys, src)
    dst = pool.alloc(2 * PAGE)
    operation = SimpleNamespace(request_id="r2", is_terminated=lambda: False)
    assert HiCacheController._generic_page_get(controller, operation, keys, dst) == 2
    assert page_bytes(pool, int(dst[PAGE])) == page_bytes(pool, int(src[PAGE]))
