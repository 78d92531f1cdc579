"""Turning layer tensors and chunk buffers into raw (pointer, size) pairs, with clear errors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvcore.copy.layout import KVLayout, _byte_strides, _elt, _shape


@dataclass
class Memory:
    """One buffer as the kernels see it; ``keep`` holds whatever keeps the memory alive."""

    ptr: int
    nbytes: int
    device: str  # "cpu" or "cuda:N"
    writable: bool
    keep: Any


def _is_torch(obj: Any) -> bool:
    return type(obj).__module__.startswith("torch") and hasattr(obj, "data_ptr")


def _device(t: Any) -> str:
    dev = t.device
    return "cpu" if dev.type == "cpu" else f"{dev.type}:{dev.index or 0}"


def extent(t: Any) -> int:
    """Bytes addressable from the tensor's base pointer through its shape and strides."""
    shape = _shape(t)
    if any(d == 0 for d in shape):
        return 0
    strides = _byte_strides(t)
    if any(s < 0 for s in strides):
        raise ValueError("KV tensors with negative strides are not supported")
    return sum((d - 1) * s for d, s in zip(shape, strides)) + _elt(t)


def layer_memory(layers: Sequence[Any]) -> list[Memory]:
    """Pointers of the layer tensors, checked to share shape, strides, dtype and device."""
    if len(layers) == 0:
        raise ValueError("layers is empty")
    first = layers[0]
    sig = (_shape(first), _byte_strides(first), str(first.dtype))
    out = []
    for i, t in enumerate(layers):
        if (_shape(t), _byte_strides(t), str(t.dtype)) != sig:
            raise ValueError(f"layers[{i}] differs from layers[0] in shape, strides or dtype "
                             f"({_shape(t)} {t.dtype} vs {sig[0]} {sig[2]})")
        if _is_torch(t):
            out.append(Memory(t.data_ptr(), extent(t), _device(t), True, t))
        elif isinstance(t, np.ndarray):
            out.append(Memory(t.ctypes.data, extent(t), "cpu", t.flags.writeable, t))
        else:
            raise TypeError(f"layers[{i}] must be a torch tensor or numpy array, got {type(t)}")
    devices = {m.device for m in out}
    if len(devices) > 1:
        raise ValueError(f"layers are on several devices: {sorted(devices)}")
    return out


def buffer_memory(buf: Any, name: str) -> Memory:
    """A chunk buffer: numpy array, memoryview/bytes-like, or torch tensor (contiguous)."""
    if _is_torch(buf):
        if not buf.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        return Memory(buf.data_ptr(), buf.numel() * buf.element_size(), _device(buf), True, buf)
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
        return Memory(buf.ctypes.data, buf.nbytes, "cpu", buf.flags.writeable, buf)
    try:
        arr = np.frombuffer(buf, dtype=np.uint8)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: expected a numpy array, torch tensor or contiguous buffer, "
                        f"got {type(buf).__name__} ({exc})") from None
    if arr.size == 0:
        return Memory(0, 0, "cpu", False, arr)
    return Memory(arr.ctypes.data, arr.nbytes, "cpu", arr.flags.writeable, arr)


@dataclass
class Plan:
    """A validated request: everything a backend needs, nothing left to check."""

    gather: bool
    layout: KVLayout
    layers: list[Memory]
    extent: int
    chunks: list[Memory]
    chunk_sizes: list[int]  # bytes each chunk needs
    block_ids: np.ndarray  # int64
    k: int
    device: str


def plan(gather: bool, layers: Sequence[Any], layout: KVLayout, block_ids: Any,
         buffers: Sequence[Any], blocks_per_chunk: int) -> Plan:
    """Validate everything before any byte moves; ValueError names the bad index or buffer."""
    if blocks_per_chunk < 1:
        raise ValueError(f"blocks_per_chunk must be >= 1, got {blocks_per_chunk}")
    mems = layer_memory(layers)
    ext = mems[0].nbytes
    if _is_torch(block_ids):
        block_ids = block_ids.detach().cpu().numpy()
    raw = np.asarray(block_ids)
    if raw.size and raw.dtype.kind not in "iu":
        raise ValueError(f"block_ids must be integers, got {raw.dtype}")
    ids = np.ascontiguousarray(raw.astype(np.int64, copy=False).reshape(-1))
    num_blocks = layout.num_blocks(ext)
    if ids.size:
        bad = np.flatnonzero((ids < 0) | (ids >= num_blocks))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"block index {int(ids[i])} (block_ids[{i}]) is out of range: the "
                             f"layer tensors hold {num_blocks} blocks of this layout")
    n, k = int(ids.size), int(blocks_per_chunk)
    num_chunks = -(-n // k)
    what = "dests" if gather else "srcs"
    if len(buffers) != num_chunks:
        raise ValueError(f"{len(buffers)} {what} for {n} blocks in chunks of {k}: "
                         f"expected {num_chunks}")
    chunks, sizes = [], []
    device = mems[0].device
    for j, buf in enumerate(buffers):
        mem = buffer_memory(buf, f"{what}[{j}]")
        need = layout.chunk_bytes(len(mems), min(k, n - j * k))
        if mem.nbytes < need:
            raise ValueError(f"{what}[{j}] is too small: {mem.nbytes} bytes, needs {need} "
                             f"({len(mems)} layers x {min(k, n - j * k)} blocks x "
                             f"{layout.block_bytes} bytes)")
        if gather and not mem.writable:
            raise ValueError(f"{what}[{j}] is read-only")
        if device == "cpu" and mem.device != "cpu":
            raise ValueError(f"{what}[{j}] is on {mem.device} but the layers are on the CPU")
        if mem.device not in ("cpu", device):
            raise ValueError(f"{what}[{j}] is on {mem.device} but the layers are on {device}")
        chunks.append(mem)
        sizes.append(need)
    return Plan(gather, layout, mems, ext, chunks, sizes, ids, k, device)
