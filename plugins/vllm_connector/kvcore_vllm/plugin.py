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


@hookimpl
def kvcore_register_benchmarks(register: Callable[..., None]) -> None:
    def add_arguments(parser):  # type: ignore[no-untyped-def]
        from kvcore_vllm.bench import add_arguments as add

        add(parser)

    def run(args):  # type: ignore[no-untyped-def]
        from kvcore_vllm.bench import run as run_bench

        return run_bench(args)

    register("engine", add_arguments, run)
