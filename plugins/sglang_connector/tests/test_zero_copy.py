"""Zero-copy v1 gets and sets on SGLang's real host KV pools (CPU), byte for byte."""

from __future__ import annotations

import pytest
import torch
from sglang_support import (
    DYNAMIC,
    PAGE,
    fill_random,
    make_mha_host_pool,
    make_mla_host_pool,
    page_bytes,
    page_keys,
    storage_config,
)

from kvcore_sglang.backend import KVCoreHiCacheStorage

LAYOUTS = ["page_first", "page_first_direct", "page_head", "layer_first"]


def _backend(pool, engine, tp_rank: int = 0, **extra) -> KVCoreHiCacheStorage:
    config = storage_config({**DYNAMIC, **extra}, tp_rank=tp_rank, tp_size=2,
                            mla=pool.__class__.__name__.startswith("MLA"))
    backend = KVCoreHiCacheStorage(config, {}, engine=engine)
    backend.register_mem_pool_host(pool)
    return backend


@pytest.mark.parametrize("layout", LAYOUTS)
def test_v1_round_trip_into_another_pool_is_byte_identical(layout, engine) -> None:
    writer, reader = make_mha_host_pool(layout), make_mha_host_pool(layout)
    _round_trip(writer, reader, engine)


@pytest.mark.parametrize("layout", ["page_first", "page_first_direct", "layer_first"])
def test_v1_round_trip_mla_shared_by_tp_ranks(layout, engine) -> None:
    """MLA KV is the same on every TP rank: rank 1 loads what rank 0 stored."""
    writer, reader = make_mla_host_pool(layout), make_mla_host_pool(layout)
    _round_trip(writer, reader, engine, reader_rank=1)


def _round_trip(writer, reader, engine, reader_rank: int = 0) -> None:
    fill_random(writer, seed=7)
    fill_random(reader, seed=8)
    src = writer.alloc(5 * PAGE)
    dst = reader.alloc(8 * PAGE)[3 * PAGE :]  # other slots than the writer's
    keys = page_keys("rt", 5)

    assert _backend(writer, engine).batch_set_v1(keys, src) == [True] * 5
    assert _backend(reader, engine, tp_rank=reader_rank).batch_get_v1(keys, dst) == [True] * 5
    for i in range(5):
        assert page_bytes(reader, int(dst[i * PAGE])) == page_bytes(writer, int(src[i * PAGE]))


@pytest.mark.parametrize("layout", ["page_first", "page_first_direct"])
def test_v1_get_writes_exactly_the_target_pages(layout, engine) -> None:
    pool = make_mha_host_pool(layout)
    fill_random(pool, seed=3)
    backend = _backend(pool, engine)
    indices = pool.alloc(4 * PAGE)
    source, target = indices[: 2 * PAGE], indices[2 * PAGE :]
    keys = page_keys("only", 2)
    assert backend.batch_set_v1(keys, source) == [True, True]

    expected = make_mha_host_pool(layout)  # what SGLang's own page copy would produce
    expected.kv_buffer.copy_(pool.kv_buffer)
    for i in range(2):
        expected.set_from_flat_data_page(int(target[i * PAGE]),
                                         pool.get_data_page(int(source[i * PAGE])))
    assert not torch.equal(expected.kv_buffer.view(torch.uint8), pool.kv_buffer.view(torch.uint8))
    assert backend.batch_get_v1(keys, target) == [True, True]
    assert torch.equal(pool.kv_buffer.view(torch.uint8), expected.kv_buffer.view(torch.uint8))


def test_generic_and_v1_pages_are_the_same_bytes_in_page_first(engine) -> None:
    """A page_first page set through the generic interface loads through v1, and back."""
    pool = make_mha_host_pool("page_first")
    fill_random(pool, seed=11)
    backend = _backend(pool, engine)
    idx = pool.alloc(2 * PAGE)
    page0 = pool.get_data_page(int(idx[0]))
    assert backend.set("generic-0", page0) is True
    assert backend.batch_set_v1(["v1-1"], idx[PAGE:]) == [True]

    out = pool.get_dummy_flat_data_page()
    got = backend.get("v1-1", out)
    assert got is out
    assert got.view(torch.uint8).numpy().tobytes() == page_bytes(pool, int(idx[PAGE]))
    spare = pool.alloc(PAGE)
    assert backend.batch_get_v1(["generic-0"], spare) == [True]
    assert page_bytes(pool, int(spare[0])) == page_bytes(pool, int(idx[0]))


def test_generic_batch_round_trip(engine) -> None:
    pool = make_mha_host_pool("page_first")
    fill_random(pool, seed=5)
    backend = _backend(pool, engine, interface_v1=0)
    idx = pool.alloc(3 * PAGE)
    values = [pool.get_data_page(int(idx[i * PAGE])) for i in range(3)]
    keys = page_keys("gen", 3)
    assert backend.batch_set(keys, values) is True
    targets = [pool.get_dummy_flat_data_page() for _ in keys]
    got = backend.batch_get(keys, targets)
    assert all(g is t for g, t in zip(got, targets))
    assert [g.view(torch.uint8).numpy().tobytes() for g in got] == [
        v.contiguous().view(torch.uint8).numpy().tobytes() for v in values]
    assert backend.get("absent", pool.get_dummy_flat_data_page()) is None
    assert backend.get("gen-0001") is not None  # no target: the backend allocates one


def test_wrong_page_size_is_a_miss_not_a_crash(engine) -> None:
    pool = make_mha_host_pool("page_first")
    backend = _backend(pool, engine)
    assert backend.set("small", torch.zeros(8, dtype=torch.bfloat16)) is True
    assert backend.batch_get_v1(["small"], pool.alloc(PAGE)) == [False]
    assert backend.get("small", pool.get_dummy_flat_data_page()) is None
