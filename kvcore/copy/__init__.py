"""Batched KV copies between an engine's paged cache and kvcore's contiguous chunk buffers.

``gather`` (store) and ``scatter`` (load) move every layer of a request in one call through the
native C++/CUDA kernels in ``kvcore/_native`` when they are built, else through numpy/torch.
"""

from kvcore.copy.layout import KVLayout
from kvcore.copy.ops import backend_info, gather, scatter

__all__ = ["KVLayout", "backend_info", "gather", "scatter"]
