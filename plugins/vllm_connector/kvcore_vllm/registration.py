"""Registration with vLLM: the ``vllm.general_plugins`` entry point calls this in every vLLM
process."""

from __future__ import annotations

import logging

log = logging.getLogger("vllm.kvcore")

CONNECTOR_NAME = "KVCoreConnector"


def register_with_vllm() -> None:
    """Make ``kv_connector="KVCoreConnector"`` work without a module path. Never raises."""
    try:
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

        if CONNECTOR_NAME not in KVConnectorFactory._registry:
            KVConnectorFactory.register_connector(
                CONNECTOR_NAME, "kvcore_vllm.connector", "KVCoreConnector")
    except Exception as exc:  # a plugin hook must not take vLLM down
        log.warning("kvcore: could not register %s with vLLM: %s", CONNECTOR_NAME, exc)
