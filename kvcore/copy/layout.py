"""KVLayout: where one engine block's bytes live inside one layer's KV tensor, described by data.

A block is ``segments`` contiguous runs of ``segment_bytes``; run ``s`` of block ``b`` starts at
byte ``b * block_stride + s * segment_stride`` from the layer tensor's base pointer. The
constructors read strides from the tensor, so views into a larger allocation describe themselves
correctly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in t.shape)


def _elt(t: Any) -> int:
    return int(t.element_size()) if hasattr(t, "element_size") else int(t.itemsize)


def _byte_strides(t: Any) -> tuple[int, ...]:
    """Strides in bytes for a torch tensor or a numpy array."""
    if hasattr(t, "element_size"):
        return tuple(int(s) * _elt(t) for s in t.stride())
    return tuple(int(s) for s in t.strides)


def _dense_bytes(t: Any, first_dim: int) -> int:
    """Bytes of dims ``first_dim..`` when they are densely packed (row-major); else ValueError."""
    shape, strides, expect = _shape(t), _byte_strides(t), _elt(t)
    for size, stride in zip(reversed(shape[first_dim:]), reversed(strides[first_dim:])):
        if size != 1 and stride != expect:
            raise ValueError(f"KV tensor dims {first_dim}.. are not contiguous "
                             f"(shape {shape}, byte strides {strides})")
        expect *= size
    return expect


def _need_dims(t: Any, ndim: int, what: str) -> None:
    if len(_shape(t)) != ndim:
        raise ValueError(f"{what} expects a {ndim}-dim tensor, got shape {_shape(t)}")


@dataclass(frozen=True)
class KVLayout:
    """Byte geometry of one engine block in one layer (see module docstring)."""

    segments: int
    segment_bytes: int
    block_stride: int
    segment_stride: int = 0

    def __post_init__(self) -> None:
        if self.segments < 1 or self.segment_bytes < 1 or self.block_stride < 0:
            raise ValueError(f"invalid KVLayout {self}")
        if self.segments > 1 and self.segment_stride < 1:
            raise ValueError(f"KVLayout with {self.segments} segments needs a segment_stride")

    @property
    def block_bytes(self) -> int:
        return self.segments * self.segment_bytes

    def num_blocks(self, extent: int) -> int:
        """Blocks that fit in a layer whose tensor spans ``extent`` bytes from its base."""
        first = (self.segments - 1) * self.segment_stride + self.segment_bytes
        if extent < first:
            return 0
        return (extent - first) // self.block_stride + 1 if self.block_stride else 1

    def chunk_bytes(self, num_layers: int, blocks: int) -> int:
        """Size of a chunk buffer holding ``blocks`` blocks of ``num_layers`` layers."""
        return num_layers * blocks * self.block_bytes

    # -- engines -------------------------------------------------------------------------------

    @classmethod
    def for_vllm_cpu(cls, tensor: Any) -> KVLayout:
        """vLLM CPU: ``[num_blocks, kv_heads, block_size, 2*head_size]``, blocks as opaque slabs."""
        _need_dims(tensor, 4, "for_vllm_cpu")
        return cls._block_major(tensor)

    @classmethod
    def for_vllm_flash(cls, tensor: Any) -> KVLayout:
        """vLLM flash-attention: ``[2, num_blocks, block_size, kv_heads, head_size]``."""
        _need_dims(tensor, 5, "for_vllm_flash")
        strides = _byte_strides(tensor)
        return cls(2, _dense_bytes(tensor, 2), strides[1], strides[0])

    @classmethod
    def for_flashinfer(cls, tensor: Any) -> KVLayout:
        """FlashInfer NHD: ``[num_blocks, 2, block_size, kv_heads, head_size]``."""
        _need_dims(tensor, 5, "for_flashinfer")
        return cls._block_major(tensor)

    @classmethod
    def for_mla(cls, tensor: Any) -> KVLayout:
        """MLA: ``[num_blocks, block_size, dim]`` (one latent vector per token)."""
        _need_dims(tensor, 3, "for_mla")
        return cls._block_major(tensor)

    @classmethod
    def _block_major(cls, tensor: Any) -> KVLayout:
        return cls(1, _dense_bytes(tensor, 1), _byte_strides(tensor)[0])

    @classmethod
    def for_sglang_layer_first(cls, kv_buffer: Any, page_size: int) -> tuple[KVLayout, list]:
        """SGLang host pool, layout ``layer_first``; returns ``(layout, per-layer views)``.

        MHA ``[2, layers, tokens, heads, head_dim]``: a page is its K run then its V run.
        MLA ``[layers, tokens, 1, dim]``: a page is one run.
        """
        strides = _byte_strides(kv_buffer)
        if len(_shape(kv_buffer)) == 5:
            _dense_bytes(kv_buffer, 2)  # a page's tokens must be one contiguous run
            run = page_size * _dense_bytes(kv_buffer, 3)
            layout = cls(2, run, strides[2] * page_size, strides[0])
            return layout, [kv_buffer[:, i] for i in range(_shape(kv_buffer)[1])]
        _need_dims(kv_buffer, 4, "for_sglang_layer_first")
        _dense_bytes(kv_buffer, 1)
        layout = cls(1, page_size * _dense_bytes(kv_buffer, 2), strides[1] * page_size)
        return layout, [kv_buffer[i] for i in range(_shape(kv_buffer)[0])]

    @classmethod
    def for_sglang_page_first(cls, kv_buffer: Any, page_size: int) -> tuple[KVLayout, list]:
        """SGLang host pool, layout ``page_first``; returns ``(layout, per-layer views)``.

        MHA ``[2, tokens, layers, heads, head_dim]``: the views are K and V of each layer in turn
        (``2*layers`` entries: K0, V0, K1, V1, ...), each page one run per token.
        MLA ``[tokens, layers, 1, dim]``: one view per layer, one run per token.
        """
        strides = _byte_strides(kv_buffer)
        if len(_shape(kv_buffer)) == 5:
            layout = cls(page_size, _dense_bytes(kv_buffer, 3), strides[1] * page_size, strides[1])
            views = []
            for i in range(_shape(kv_buffer)[2]):
                views += [kv_buffer[0, :, i], kv_buffer[1, :, i]]
            return layout, views
        _need_dims(kv_buffer, 4, "for_sglang_page_first")
        layout = cls(page_size, _dense_bytes(kv_buffer, 2), strides[0] * page_size, strides[0])
        return layout, [kv_buffer[:, i] for i in range(_shape(kv_buffer)[1])]
