"""SGLang's own storage backend factory loads kvcore through the dynamic path."""

from __future__ import annotations

import json

from sglang_support import (
    DYNAMIC,
    PAGE,
    fill_random,
    make_mha_host_pool,
    page_bytes,
    page_keys,
    storage_config,
)

from kvcore.plugins import PluginRegistry


def test_factory_dynamic_path_builds_kvcore_backend(engine) -> None:
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorage
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    from kvcore_sglang.backend import KVCoreHiCacheStorage

    pool = make_mha_host_pool("page_first")
    # The extra config exactly as SGLang parses it from --hicache-storage-backend-extra-config.
    extra = json.loads(json.dumps({**DYNAMIC, "tenant": "acme"}))
    backend = StorageBackendFactory.create_backend("dynamic", storage_config(extra), pool)
    try:
        assert isinstance(backend, HiCacheStorage)
        assert isinstance(backend, KVCoreHiCacheStorage)
        assert backend.zero_copy and backend.options.tenant == "acme"
        backend.register_mem_pool_host(pool)  # what the cache controller does next
        assert backend.engine.chunk_size == PAGE  # engine chunk = SGLang page

        fill_random(pool, seed=1)
        indices = pool.alloc(3 * PAGE)
        keys = page_keys("f", 3)
        assert backend.batch_set_v1(keys, indices) == [True, True, True]
        assert backend.batch_exists(keys) == 3
        expected = [page_bytes(pool, int(indices[i * PAGE])) for i in range(3)]
        pool.kv_buffer.zero_()
        assert backend.batch_get_v1(keys, indices) == [True, True, True]
        assert [page_bytes(pool, int(indices[i * PAGE])) for i in range(3)] == expected
    finally:
        backend.close()


def test_cache_controller_selects_zero_copy_for_interface_v1() -> None:
    """The controller's switch to batch_get_v1/batch_set_v1 is the ``interface_v1`` key."""
    import inspect

    from sglang.srt.managers.cache_controller import HiCacheController

    source = inspect.getsource(HiCacheController.attach_storage_backend)
    assert 'extra_config.get("interface_v1"' in source
    assert "_page_get_zero_copy" in source


def test_kvcore_plugin_registers_the_connector() -> None:
    registry = PluginRegistry().load()
    info = registry.connectors["sglang-hicache"]
    assert info.engine == "sglang"
    assert info.import_path == "kvcore_sglang.backend:KVCoreHiCacheStorage"
    assert "SGLangSettings" in {cls.__name__ for cls in registry.settings.values()}


def test_kvcore_settings_from_extra_config() -> None:
    from kvcore_sglang.backend import KVCoreHiCacheStorage

    extra = {**DYNAMIC, "kvcore": {"cpu_size": "1MiB", "tiers": "cpu"}, "tenant": "t"}
    backend = KVCoreHiCacheStorage(storage_config(extra), {})
    try:
        backend.register_mem_pool_host(make_mha_host_pool("page_first"))
        assert backend.engine.settings.cpu_size == 1024**2
        assert backend.engine.chunk_size == PAGE
        assert [t.name for t in backend.engine.tiers] == ["cpu"]
    finally:
        backend.close()
    assert backend.batch_exists(["after-close"]) == 0  # a closed engine still answers


def test_bad_kvcore_settings_fail_at_startup_with_the_variable_named() -> None:
    import pytest

    from kvcore.config import ConfigError
    from kvcore_sglang.backend import KVCoreHiCacheStorage

    with pytest.raises(ConfigError, match="KVCORE_CPU_SIZE"):
        KVCoreHiCacheStorage(storage_config({**DYNAMIC, "kvcore": {"cpu_size": "lots"}}), {})


def test_engine_chunk_follows_the_page_unless_configured(monkeypatch) -> None:
    from kvcore_sglang.backend import KVCoreHiCacheStorage

    monkeypatch.setenv("KVCORE_CHUNK_SIZE", "32")
    backend = KVCoreHiCacheStorage(storage_config(dict(DYNAMIC)), {})
    try:
        backend.register_mem_pool_host(make_mha_host_pool("page_first"))
        assert backend.engine.chunk_size == 32  # an explicit setting wins over the page size
    finally:
        backend.close()
