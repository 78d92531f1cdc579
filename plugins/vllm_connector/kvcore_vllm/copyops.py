"""The batched block copies (``kvcore.copy``) and which layout a vLLM KV tensor has."""

from __future__ import annotations

from typing import Any

from kvcore.copy import KVLayout, gather, scatter

__all__ = ["KVLayout", "gather", "scatter", "layout_for"]


def layout_for(tensor: Any) -> KVLayout:
    """The layout of one vLLM KV tensor.

    CPU ``[blocks, kv_heads, block, 2*head]`` (4 dims), flash-attention
    ``[2, blocks, block, kv_heads, head]`` (K and V planes), FlashInfer
    ``[blocks, 2, block, kv_heads, head]`` and MLA ``[blocks, block, dim]``.
    """
    dims = tensor.dim()
    if dims == 4:
        return KVLayout.for_vllm_cpu(tensor)
    if dims == 5 and tensor.shape[0] == 2:
        return KVLayout.for_vllm_flash(tensor)
    if dims == 5:
        return KVLayout.for_flashinfer(tensor)
    if dims == 3:
        return KVLayout.for_mla(tensor)
    raise ValueError(f"kvcore: unknown vLLM KV cache shape {tuple(tensor.shape)}")
