"""Pure numpy (host) and torch (CUDA) copies, used when the native libraries are missing.

Each layer is seen as a strided uint8 view ``[num_blocks, segments, segment_bytes]`` over its raw
memory, so every layout takes the same code path as the kernels.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from kvcore.copy.buffers import Memory, Plan


def _host_bytes(mem: Memory, nbytes: int) -> np.ndarray:
    if nbytes == 0:
        return np.empty(0, dtype=np.uint8)
    raw = (ctypes.c_ubyte * nbytes).from_address(mem.ptr)
    return np.frombuffer(memoryview(raw).cast("B"), dtype=np.uint8)


def _blocks(flat: Any, p: Plan, as_strided: Any) -> Any:
    lay = p.layout
    nb = lay.num_blocks(p.extent)
    return as_strided(flat, (nb, lay.segments, lay.segment_bytes),
                      (lay.block_stride, lay.segment_stride, 1))


def _chunk_view(buf: Any, p: Plan, j: int) -> Any:
    n, k, lay = p.block_ids.size, p.k, p.layout
    kj = min(k, n - j * k)
    return buf[: p.chunk_sizes[j]].reshape(len(p.layers), kj, lay.segments, lay.segment_bytes)


def run_numpy(p: Plan) -> None:
    """Host layers, host chunk buffers."""
    strided = np.lib.stride_tricks.as_strided
    views = [_blocks(_host_bytes(m, p.extent), p, strided) for m in p.layers]
    for j, mem in enumerate(p.chunks):
        ids = p.block_ids[j * p.k : (j + 1) * p.k]
        chunk = _chunk_view(_host_bytes(mem, p.chunk_sizes[j]), p, j)
        for layer, view in enumerate(views):
            if p.gather:
                np.take(view, ids, axis=0, out=chunk[layer])
            else:
                view[ids] = chunk[layer]


def _torch_bytes(mem: Memory, nbytes: int, device: str) -> Any:
    import torch

    if hasattr(mem.keep, "untyped_storage"):  # a torch tensor: alias its storage as bytes
        t = mem.keep
        out = torch.empty(0, dtype=torch.uint8, device=t.device)
        offset = t.storage_offset() * t.element_size()
        return out.set_(t.untyped_storage(), offset, (nbytes,), (1,))
    return torch.from_numpy(_host_bytes(mem, nbytes))  # host memory from numpy / buffers


def run_torch(p: Plan, stream: Any) -> None:
    """CUDA layers (chunk buffers on the host or the same device), on ``stream``."""
    import torch

    ids_all = torch.from_numpy(p.block_ids).to(p.device)
    views = [_blocks(_torch_bytes(m, p.extent, p.device), p, torch.as_strided) for m in p.layers]
    ctx = torch.cuda.stream(stream) if stream is not None else torch.cuda.device(p.device)
    with ctx:
        for j, mem in enumerate(p.chunks):
            ids = ids_all[j * p.k : (j + 1) * p.k]
            chunk = _chunk_view(_torch_bytes(mem, p.chunk_sizes[j], p.device), p, j)
            if p.gather:
                chunk.copy_(torch.stack([v.index_select(0, ids) for v in views]))
            else:
                staged = chunk.to(p.device)
                for layer, view in enumerate(views):
                    view.index_copy_(0, ids, staged[layer])
