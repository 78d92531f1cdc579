"""kvcore-vllm: kvcore as a vLLM v1 KV connector.

Use it with ``--kv-transfer-config '{"kv_connector":"KVCoreConnector","kv_role":"kv_both"}'``
(the name is registered through vLLM's ``vllm.general_plugins`` entry point), or with
``kv_connector_module_path="kvcore_vllm"``. vLLM itself is not a dependency: install it first.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KVCoreConnector", "SUPPORTED_VLLM"]

SUPPORTED_VLLM = ">=0.31,<0.33"
"""vLLM versions this connector is tested with (see docs/vllm.md)."""


def __getattr__(name: str) -> Any:
    # Lazy, so `kvcore plugins` and the vLLM plugin hook do not import vLLM's connector stack.
    if name == "KVCoreConnector":
        from kvcore_vllm.connector import KVCoreConnector

        return KVCoreConnector
    raise AttributeError(name)
