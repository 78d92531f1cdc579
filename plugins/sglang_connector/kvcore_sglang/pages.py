"""Byte views of pages in an SGLang host KV pool, for zero-copy v1 gets and sets.

SGLang's host pools describe where a page lives with ``get_page_buffer_meta(indices)``: a list of
(pointer, size) pieces, the same number per page (page-first MHA: K then V; MLA: one piece;
layer-first: K and V per layer). Each piece is resolved to a numpy view of one of the pool's own
host tensors, after checking that it lies inside that tensor, so kvcore copies straight between
its chunk buffers and the pool's memory with no staging tensor in between.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

_BUFFER_ATTRS = ("kv_buffer", "k_buffer", "v_buffer", "index_k_buffer", "index_k_scale_buffer")


class PageViewError(ValueError):
    """The pool described a page piece that is not inside any of its host buffers."""


def _as_bytes(tensor: torch.Tensor) -> np.ndarray:
    return tensor.reshape(-1).view(torch.uint8).numpy()


class HostPages:
    """Resolves page pieces of one host pool to writable numpy byte views."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.page_size = int(pool.page_size)
        self._ranges: list[tuple[int, int, np.ndarray]] = []
        seen: set[int] = set()
        for name in _BUFFER_ATTRS:
            tensor = getattr(pool, name, None)
            if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
                continue
            if not tensor.is_contiguous() or tensor.numel() == 0:
                continue
            start = tensor.data_ptr()
            if start in seen and name != "kv_buffer":
                continue
            seen.add(start)
            flat = _as_bytes(tensor)
            self._ranges.append((start, start + flat.nbytes, flat))
        if not self._ranges:
            raise PageViewError(f"{type(pool).__name__} exposes no contiguous CPU host buffer")

    def _view(self, ptr: int, size: int) -> np.ndarray:
        for start, end, flat in self._ranges:
            if start <= ptr and ptr + size <= end:
                return flat[ptr - start : ptr - start + size]
        raise PageViewError(f"page piece at {ptr:#x}+{size} is outside the host pool's buffers")

    def pages(self, host_indices: torch.Tensor, count: int) -> list[list[np.ndarray]]:
        """Views of the pieces of the first ``count`` pages of ``host_indices``."""
        if count == 0:
            return []
        indices = host_indices[: count * self.page_size]
        if indices.numel() != count * self.page_size:
            raise PageViewError(
                f"{indices.numel()} host indices for {count} pages of {self.page_size} tokens"
            )
        ptrs, sizes = self.pool.get_page_buffer_meta(indices)
        if len(ptrs) != len(sizes) or len(ptrs) % count:
            raise PageViewError(f"{len(ptrs)} page pieces do not split into {count} pages")
        per_page = len(ptrs) // count
        views = [self._view(int(p), int(s)) for p, s in zip(ptrs, sizes)]
        return [views[i * per_page : (i + 1) * per_page] for i in range(count)]


def page_nbytes(pieces: Sequence[np.ndarray]) -> int:
    return sum(p.nbytes for p in pieces)


def gather_page(pieces: Sequence[np.ndarray], dest: np.ndarray) -> None:
    """Copy a page's pieces, in order, into one chunk buffer."""
    offset = 0
    for piece in pieces:
        dest[offset : offset + piece.nbytes] = piece
        offset += piece.nbytes


def scatter_page(src: np.ndarray, pieces: Sequence[np.ndarray]) -> None:
    """Copy one chunk buffer back into a page's pieces."""
    offset = 0
    for piece in pieces:
        piece[:] = src[offset : offset + piece.nbytes]
        offset += piece.nbytes


def tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor's bytes as a uint8 array (a view when it is contiguous)."""
    return _as_bytes(tensor.detach().contiguous().cpu())
