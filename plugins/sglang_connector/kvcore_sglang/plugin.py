"""kvcore plugin entry point: makes `kvcore plugins` list the SGLang backend and its settings."""

from __future__ import annotations

from collections.abc import Callable

from kvcore.hookspecs import hookimpl
from kvcore.interfaces import ConnectorInfo
from kvcore_sglang import BACKEND_CLASS, BACKEND_MODULE, SUPPORTED_SGLANG
from kvcore_sglang.settings import SGLangSettings


@hookimpl
def kvcore_register_connectors(register: Callable[..., None]) -> None:
    register(
        ConnectorInfo(
            name="sglang-hicache",
            engine="sglang",
            import_path=f"{BACKEND_MODULE}:{BACKEND_CLASS}",
            description=f"SGLang HiCache storage backend (dynamic), SGLang {SUPPORTED_SGLANG}",
        )
    )


@hookimpl
def kvcore_register_settings(register: Callable[..., None]) -> None:
    register(SGLangSettings)
