"""SGLang's real HiCache storage classes behind ``kvcore server``: two backends, each building
its own kvcore engine from the environment as SGLang does, attach to one real server process
and share its memory (each engine is its own client of the server, with its own lease)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sglang_support import (
    DYNAMIC,
    PAGE,
    fill_random,
    make_mha_host_pool,
    page_bytes,
    page_keys,
    storage_config,
)

from kvcore.testing.server import ServerProcess, serving
from kvcore_sglang.backend import KVCoreHiCacheStorage

pytest.importorskip("zmq")
pytest.importorskip("msgspec")


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path, budget=16 << 20)
    yield from serving(srv, monkeypatch.setenv)


def backend(pool) -> KVCoreHiCacheStorage:  # type: ignore[no-untyped-def]
    """A backend as SGLang makes it: no engine given, so it builds one from KVCORE_*."""
    made = KVCoreHiCacheStorage(storage_config(DYNAMIC), {})
    made.register_mem_pool_host(pool)
    return made


def test_a_page_set_by_one_backend_loads_in_another_through_the_server(
        server: ServerProcess) -> None:
    writer_pool, reader_pool = make_mha_host_pool("page_first"), make_mha_host_pool("page_first")
    fill_random(writer_pool, seed=21)
    fill_random(reader_pool, seed=22)
    writer, reader = backend(writer_pool), backend(reader_pool)
    try:
        assert type(writer.engine.memory).__name__ == "ServerTier"
        assert writer.engine is not reader.engine
        src = writer_pool.alloc(3 * PAGE)
        dst = reader_pool.alloc(6 * PAGE)[3 * PAGE :]
        keys = page_keys("shared", 3)
        assert writer.batch_set_v1(keys, src) == [True] * 3
        assert reader.batch_exists(keys) == 3
        assert reader.batch_get_v1(keys, dst) == [True] * 3
        for i in range(3):
            assert (page_bytes(reader_pool, int(dst[i * PAGE]))
                    == page_bytes(writer_pool, int(src[i * PAGE])))
        assert reader.engine.memory.usage().chunks == 3  # one copy, in the server

        server.kill()  # down: misses, never an error in SGLang's calls
        assert reader.batch_exists(keys) == 0
        assert reader.batch_get_v1(keys, dst) == [False] * 3
    finally:
        writer.close()
        reader.close()
