"""Namespaces: tenants, ranks, models and page layouts never see each other's pages."""

from __future__ import annotations

import pytest
from sglang_support import DYNAMIC, PAGE, make_mha_host_pool, page_keys, storage_config

from kvcore_sglang.backend import KVCoreHiCacheStorage
from kvcore_sglang.keys import ShardInfo


def _backend(engine, pool, extra=None, **config) -> KVCoreHiCacheStorage:
    backend = KVCoreHiCacheStorage(storage_config({**DYNAMIC, **(extra or {})}, **config), {},
                                   engine=engine)
    backend.register_mem_pool_host(pool)
    return backend


@pytest.mark.parametrize("other", [
    {"extra": {"tenant": "globex"}},
    {"tp_rank": 1, "tp_size": 2},
    {"model": "test/other-model"},
])
def test_pages_are_private_to_their_namespace(engine, other) -> None:
    pool = make_mha_host_pool("page_first")
    owner = _backend(engine, pool, {"tenant": "acme"}, tp_size=2)
    keys = page_keys("secret", 2)
    assert owner.batch_set_v1(keys, pool.alloc(2 * PAGE)) == [True, True]
    assert owner.batch_exists(keys) == 2

    settings = {"extra": {"tenant": "acme"}, "tp_size": 2, **other}
    intruder = _backend(engine, pool, settings.pop("extra"), **settings)
    assert intruder.namespace() != owner.namespace()
    assert intruder.batch_exists(keys) == 0
    assert intruder.batch_get_v1(keys, pool.alloc(2 * PAGE)) == [False, False]
    assert intruder.get(keys[0], pool.get_dummy_flat_data_page()) is None


def test_same_namespace_in_another_process_shares(engine) -> None:
    pool = make_mha_host_pool("page_first")
    first = _backend(engine, pool, {"tenant": "acme"})
    second = _backend(engine, make_mha_host_pool("page_first"), {"tenant": "acme"})
    assert first.namespace() == second.namespace()
    assert first.batch_set_v1(["shared"], pool.alloc(PAGE)) == [True]
    assert second.batch_exists(["shared"]) == 1


def test_page_layout_and_tenant_env_are_part_of_the_namespace(engine, monkeypatch) -> None:
    first = _backend(engine, make_mha_host_pool("page_first"))
    direct = _backend(engine, make_mha_host_pool("page_first_direct"))
    assert first.namespace().layout == "sglang:page_first"
    assert direct.namespace().layout == "sglang:page_first_direct"
    assert first.namespace().digest != direct.namespace().digest
    assert "layer_num=2" in first.namespace().geometry

    monkeypatch.setenv("KVCORE_SGLANG_TENANT", "from-env")
    assert _backend(engine, make_mha_host_pool("page_first")).namespace().tenant == "from-env"
    explicit = _backend(engine, make_mha_host_pool("page_first"), {"tenant": "from-config"})
    assert explicit.namespace().tenant == "from-config"


def test_per_request_tenant_from_extra_info(engine) -> None:
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageExtraInfo

    pool = make_mha_host_pool("page_first")
    backend = _backend(engine, pool)
    mine = HiCacheStorageExtraInfo(extra_info={"tenant": "t1"})
    theirs = HiCacheStorageExtraInfo(extra_info={"tenant": "t2"})
    assert backend.batch_set_v1(["p"], pool.alloc(PAGE), mine) == [True]
    assert backend.batch_exists(["p"], mine) == 1
    assert backend.batch_exists(["p"], theirs) == 0
    assert backend.batch_exists(["p"]) == 0


def test_mla_shards_share_across_tp_ranks() -> None:
    from sglang_support import storage_config as make

    rank0 = ShardInfo.from_storage_config(make(tp_rank=0, tp_size=2))
    rank1 = ShardInfo.from_storage_config(make(tp_rank=1, tp_size=2))
    assert rank0 != rank1 and not rank0.rank_replicated
    config = make(tp_rank=1, tp_size=2)
    config.is_mla_model = True
    assert ShardInfo.from_storage_config(config).rank_replicated
