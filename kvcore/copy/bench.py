"""``kvcore bench copy``: batched gather/scatter GB/s against a plain memcpy of the same bytes.

Geometry like Llama-3-8B (32 layers, 8 KV heads, head size 128, bf16) in vLLM's CPU layout, chunks
of 256 tokens made of several engine blocks, several chunks per call, blocks picked at random from a
pool twice the request size. The baseline is one contiguous copy of the same number of bytes,
measured in the same run. On a GPU it also measures vLLM flash layout on the device against
pinned host chunks, vs ``cudaMemcpyAsync`` pinned<->device of the same bytes.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from kvcore.hookspecs import hookimpl


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16, help="engine block size (tokens)")
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--chunks", type=int, default=4, help="chunks per call")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="native CPU threads (0: default)")
    parser.add_argument("--backend", choices=("auto", "native", "fallback"), default="auto")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU part")


def _interleaved(fns: dict[str, Callable[[], None]], repeat: int,
                 sync: Callable[[], None] = lambda: None) -> dict[str, dict[str, float]]:
    """Seconds per call, best and median, running the candidates in turn each round so that
    background load on a shared machine hits all of them alike."""
    for fn in fns.values():  # warm-up: first-touch page faults, lazy loads
        fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: {"best": min(t), "median": float(np.median(t))} for name, t in times.items()}


def _figures(total: int, secs: dict[str, dict[str, float]], base: dict[str, str]
             ) -> dict[str, Any]:
    """gbps (best of the rounds), gbps_median, and ratio to the named baseline per candidate."""
    gbps = {n: round(total / s["best"] / 1e9, 2) for n, s in secs.items()}
    median = {n: round(total / s["median"] / 1e9, 2) for n, s in secs.items()}
    ratio = {n: round(gbps[n] / gbps[b], 3) for n, b in base.items()}
    return {"gbps": {n: gbps[n] for n in base}, "gbps_median": {n: median[n] for n in base},
            "ratio": ratio, "baseline": {n: gbps[n] for n in secs if n not in base}}


def _geometry(args: argparse.Namespace) -> dict[str, int]:
    if args.chunk_tokens % args.block_size:
        raise SystemExit("--chunk-tokens must be a multiple of --block-size")
    k = args.chunk_tokens // args.block_size
    return {"layers": args.layers, "kv_heads": args.kv_heads, "head_size": args.head_size,
            "block_size": args.block_size, "blocks_per_chunk": k, "chunks": args.chunks,
            "pool_blocks": 2 * k * args.chunks, "dtype_bytes": 2}


def _cpu(args: argparse.Namespace, g: dict[str, int]) -> dict[str, Any]:
    import torch

    from kvcore.copy import KVLayout, native, ops
    from kvcore.copy.buffers import plan

    shape = (g["pool_blocks"], g["kv_heads"], g["block_size"], 2 * g["head_size"])
    layers = [torch.ones(shape, dtype=torch.bfloat16) for _ in range(g["layers"])]
    layout = KVLayout.for_vllm_cpu(layers[0])
    k, n = g["blocks_per_chunk"], g["blocks_per_chunk"] * g["chunks"]
    ids = np.random.default_rng(0).permutation(g["pool_blocks"])[:n]
    chunk_bytes = layout.chunk_bytes(g["layers"], k)
    chunks = [np.ones(chunk_bytes, dtype=np.uint8) for _ in range(g["chunks"])]
    total = chunk_bytes * g["chunks"]
    if args.threads and native.cpu_lib() is not None:
        native.set_cpu_threads(args.threads)

    def copy(gather: bool) -> Callable[[], None]:
        return lambda: ops.run(plan(gather, layers, layout, ids, chunks, k), None, args.backend)

    src, dst = np.ones(total, dtype=np.uint8), np.zeros(total, dtype=np.uint8)
    secs = _interleaved({"memcpy": lambda: np.copyto(dst, src), "gather": copy(True),
                         "scatter": copy(False)}, args.repeat)
    fig = _figures(total, secs, {"gather": "memcpy", "scatter": "memcpy"})
    return {
        "bytes_per_call": total,
        "gbps": fig["gbps"],
        "gbps_median": fig["gbps_median"],
        "memcpy_gbps": fig["baseline"]["memcpy"],
        "ratio": fig["ratio"],
        "copy_threads": native.cpu_threads() if args.backend != "fallback" else 1,
        "memcpy": "numpy.copyto of one contiguous buffer (glibc memcpy, one thread)",
        "timing": f"best of {args.repeat} interleaved rounds (gbps_median: median)",
    }


def _gpu(args: argparse.Namespace, g: dict[str, int]) -> dict[str, Any]:
    import torch

    from kvcore.copy import KVLayout, ops
    from kvcore.copy.buffers import plan

    dev = torch.device("cuda")
    shape = (2, g["pool_blocks"], g["block_size"], g["kv_heads"], g["head_size"])
    layers = [torch.ones(shape, dtype=torch.bfloat16, device=dev) for _ in range(g["layers"])]
    layout = KVLayout.for_vllm_flash(layers[0])
    k, n = g["blocks_per_chunk"], g["blocks_per_chunk"] * g["chunks"]
    ids = np.random.default_rng(0).permutation(g["pool_blocks"])[:n]
    chunk_bytes = layout.chunk_bytes(g["layers"], k)
    chunks = [torch.ones(chunk_bytes, dtype=torch.uint8, pin_memory=True)
              for _ in range(g["chunks"])]
    total = chunk_bytes * g["chunks"]
    stream = torch.cuda.Stream()
    sync = stream.synchronize
    host = torch.ones(total, dtype=torch.uint8, pin_memory=True)
    device_buf = torch.ones(total, dtype=torch.uint8, device=dev)
    torch.cuda.synchronize()  # the side stream must not race the fills above

    def memcpy(to_host: bool) -> Callable[[], None]:
        def fn() -> None:
            with torch.cuda.stream(stream):
                if to_host:
                    host.copy_(device_buf, non_blocking=True)
                else:
                    device_buf.copy_(host, non_blocking=True)
        return fn

    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "bytes_per_call": total,
                           "layout": "vllm flash [2, num_blocks, bs, H, D], pinned host chunks"}
    fns: dict[str, Callable[[], None]] = {"d2h": memcpy(True), "h2d": memcpy(False)}
    base: dict[str, str] = {}

    def mode_run(mode: str, is_gather: bool) -> Callable[[], None]:
        def fn() -> None:
            os.environ["KVCORE_COPY_CUDA_MODE"] = mode
            ops.run(plan(is_gather, layers, layout, ids, chunks, k), stream, args.backend)
        return fn

    saved = os.environ.get("KVCORE_COPY_CUDA_MODE")
    try:
        for mode in ("direct", "staged"):
            for name, is_gather, b in (("gather", True, "d2h"), ("scatter", False, "h2d")):
                fns[f"{name}_{mode}"] = mode_run(mode, is_gather)
                base[f"{name}_{mode}"] = b
        secs = _interleaved(fns, args.repeat, sync)
    finally:
        if saved is None:
            os.environ.pop("KVCORE_COPY_CUDA_MODE", None)
        else:
            os.environ["KVCORE_COPY_CUDA_MODE"] = saved
    fig = _figures(total, secs, base)
    out.update(gbps=fig["gbps"], gbps_median=fig["gbps_median"], ratio=fig["ratio"],
               memcpy_gbps=fig["baseline"], memcpy="cudaMemcpyAsync pinned<->device (torch copy_)")
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure and return the figures (see module docstring)."""
    from kvcore.copy import backend_info

    g = _geometry(args)
    cpu = _cpu(args, g)
    figures: dict[str, Any] = {
        "compared": "kvcore.copy gather/scatter vs memcpy of the same bytes",
        "machine": (f"{platform.machine()} {os.cpu_count()} cpus "
                    f"{platform.processor() or ''}").strip(),
        "backend": backend_info()["active"] if args.backend != "fallback" else "fallback",
        "geometry": g,
        **cpu,
    }
    try:
        import torch

        has_gpu = torch.cuda.is_available() and not args.no_gpu
    except ImportError:
        has_gpu = False
    figures["gpu"] = _gpu(args, g) if has_gpu else {"skipped": "no CUDA device (or --no-gpu)"}
    return figures


@hookimpl
def kvcore_register_settings(register: Callable[..., None]) -> None:
    from kvcore.copy.settings import CopySettings

    register(CopySettings)


@hookimpl
def kvcore_register_benchmarks(register: Callable[..., None]) -> None:
    register("copy", add_arguments, run)
