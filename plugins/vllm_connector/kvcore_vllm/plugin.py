"""kvcore plugin hooks: list the connector in `kvcore plugins`, register its settings."""

from __future__ import annotations

from collections.abc import Callable

from kvcore.hookspecs import hookimpl
from kvcore.interfaces import ConnectorInfo
from kvcore_vllm.settings import VllmSettings


@hookimpl
def kvcore_register_connectors(register: Callable[..., None]) -> None:
    register(ConnectorInfo(
        name="KVCoreConnector",
        engine="vllm",
        import_path="kvcore_vllm:KVCoreConnector",
        description="vLLM v1 KV connector (kv_both): offload, reuse across requests and "
                    "restarts; supported vLLM 0.32.x",
    ))


@hookimpl
def kvcore_register_settings(register: Callable[..., None]) -> None:
    register(VllmSettings)
