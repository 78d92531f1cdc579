"""gather / scatter: the batched copies between engine KV blocks and kvcore chunk buffers.

Chunk buffer format (every layout): for a chunk of k engine blocks and L layers, layer-major, then
block, then segment: ``[L][k][segments][segment_bytes]``. Chunk j holds ``block_ids[j*k:(j+1)*k]``;
the last chunk may hold fewer blocks. All layers and chunks go in one native call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvcore.copy import fallback, native
from kvcore.copy.buffers import Plan, plan
from kvcore.copy.layout import KVLayout
from kvcore.copy.settings import copy_settings

BACKENDS = ("auto", "native", "fallback")


def _stream_handle(stream: Any, device: str) -> tuple[int, Any]:
    """(raw cudaStream_t, torch stream or None) for ``stream`` (None: torch's current stream)."""
    import torch

    if stream is None:
        stream = torch.cuda.current_stream(torch.device(device))
    if isinstance(stream, int):
        return stream, torch.cuda.ExternalStream(stream) if stream else None
    return int(stream.cuda_stream), stream


def _cuda_mode() -> int:
    return 1 if copy_settings().copy_cuda_mode == "staged" else 0


def run(p: Plan, stream: Any = None, backend: str = "auto") -> None:
    """Execute a validated plan on ``backend`` ("auto", "native" or "fallback")."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown copy backend {backend!r}; one of {BACKENDS}")
    if p.block_ids.size == 0:
        return
    if p.device == "cpu":
        if backend != "fallback" and native.cpu_lib() is not None:
            return native.run_cpu(p)
        if backend == "native":
            raise RuntimeError(f"native CPU copy unavailable: {native.errors.get(native.CPU_LIB)}")
        return fallback.run_numpy(p)
    handle, torch_stream = _stream_handle(stream, p.device)
    if backend != "fallback" and native.cuda_usable() is not None:
        import torch

        with torch.cuda.device(p.device):
            return native.run_cuda(p, handle, _cuda_mode())
    if backend == "native":
        raise RuntimeError(f"native CUDA copy unavailable: {native.errors.get(native.CUDA_LIB)}")
    return fallback.run_torch(p, torch_stream)


def gather(layers: Sequence[Any], layout: KVLayout, block_ids: Any, dests: Sequence[Any],
           blocks_per_chunk: int, stream: Any = None) -> None:
    """Copy blocks ``block_ids[j*k:(j+1)*k]`` of every layer into ``dests[j]`` (k =
    ``blocks_per_chunk``), all layers and chunks in one native call. ValueError naming the bad
    block index or too-small buffer before any byte is written."""
    run(plan(True, layers, layout, block_ids, dests, blocks_per_chunk), stream)


def scatter(srcs: Sequence[Any], layers: Sequence[Any], layout: KVLayout, block_ids: Any,
            blocks_per_chunk: int, stream: Any = None) -> None:
    """The inverse of :func:`gather`: chunk buffers -> engine blocks. Where ``block_ids`` repeats
    a block, which chunk's bytes land there is unspecified."""
    run(plan(False, layers, layout, block_ids, srcs, blocks_per_chunk), stream)


def _torch_sees_gpu() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken torch install means no GPU path
        return False


def backend_info() -> dict[str, Any]:
    """Which copy path is active: ``native-cuda``, ``native-cpu`` or ``torch`` (the fallback).

    Does not initialize CUDA itself: GPU presence is torch's answer."""
    cpu = native.cpu_lib()
    cuda = native.cuda_lib() if native._cuda_ok is not False else None
    gpus = _torch_sees_gpu()
    active = "native-cuda" if cuda is not None and gpus else "native-cpu" if cpu else "torch"
    return {
        "active": active,
        "cpu": "native" if cpu else "numpy fallback",
        "cuda": ("native" if cuda else "torch fallback") + ("" if gpus else " (no GPU seen)"),
        "cpu_threads": native.cpu_threads(),
        "cuda_mode": "staged" if _cuda_mode() else "direct",
        "native_dir": str(native._dir()),
        "errors": {k: v for k, v in native.errors.items()},
    }
