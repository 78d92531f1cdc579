"""kvcore plugin hooks: list the connector in `kvcore plugins`, register its settings."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
                    "restarts; supported vLLM 0.31.x and 0.32.x",
    ))


@hookimpl
def kvcore_register_settings(register: Callable[..., None]) -> None:
    register(VllmSettings)


def _lazy_benchmark(module: str) -> tuple[Callable[..., None], Callable[..., dict]]:
    """``add_arguments`` and ``run`` of a benchmark module, imported only when used (vLLM is
    heavy to import)."""
    from importlib import import_module

    def add_arguments(parser: Any) -> None:
        import_module(module).add_arguments(parser)

    def run(args: Any) -> dict:
        return import_module(module).run(args)

    return add_arguments, run


@hookimpl
def kvcore_register_benchmarks(register: Callable[..., None]) -> None:
    register("engine", *_lazy_benchmark("kvcore_vllm.bench"))
    register("stall", *_lazy_benchmark("kvcore_vllm.bench_stall"))
    register("verify", *_lazy_benchmark("kvcore_vllm.bench_verify"))
    register("codec", *_lazy_benchmark("kvcore_vllm.bench_codec"))
    register("planner", *_lazy_benchmark("kvcore_vllm.bench_planner"))
