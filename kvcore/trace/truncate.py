"""Context truncation of trace requests, and re-keying of the blocks that survive it.

A request longer than ``max_tokens`` keeps only part of its input. The KV of a kept block
depends on every token before it, so once the front is cut every kept block has a new prefix
and a new key, derived deterministically from what it now holds: the first kept token's
position, the block's end position, and the original (prefix-chained) id of the block holding
its last token, which pins down every token before it.

Two modes:

- ``tail`` keeps exactly the last ``max_tokens`` tokens. The cut moves with every turn of a
  conversation, so consecutive turns share no kept block: prefix hits collapse.
- ``stable`` is kvcore's cache-friendly truncation: keep the first ``head_blocks`` blocks
  (system prompt, shared document head; their keys are unchanged), drop a middle whose length
  is a multiple of ``stride`` tokens (a multiple of the block size), keep the rest. The cut only
  moves when a conversation has grown by another stride, so turns in between share it and hit,
  and the head is shared with every untruncated request. At most ``max_tokens`` are kept.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from kvcore.trace.format import BLOCK_TOKENS, Request

Block = tuple[bool, int]
"""A block of a (possibly truncated) request: (derived id?, id)."""


@dataclass(frozen=True)
class Truncation:
    """How to cut long requests; ``max_tokens=None`` keeps everything."""

    max_tokens: int | None = None
    mode: str = "tail"
    head_blocks: int = 1
    stride: int | None = None
    """``stable`` mode: tokens by which the cut moves (default: a quarter of the budget)."""

    def __post_init__(self) -> None:
        if self.mode not in ("tail", "stable"):
            raise ValueError(f"truncation mode must be 'tail' or 'stable', not {self.mode!r}")
        if self.max_tokens is not None and self.max_tokens < BLOCK_TOKENS:
            raise ValueError(f"truncate-to must be at least one block ({BLOCK_TOKENS} tokens)")


def _derived_id(mode: str, start: int, end: int, original: int, head: int) -> int:
    data = f"{mode}:{start}:{end}:{original}:{head}".encode()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little")


def _window(ids: tuple[int, ...], length: int, start: int, mode: str, head: int) -> list[Block]:
    blocks: list[Block] = []
    for begin in range(start, length, BLOCK_TOKENS):
        end = min(begin + BLOCK_TOKENS, length)
        original = ids[min((end - 1) // BLOCK_TOKENS, len(ids) - 1)]
        blocks.append((True, _derived_id(mode, start, end, original, head)))
    return blocks


def request_blocks(request: Request, truncation: Truncation) -> tuple[list[Block], int]:
    """Blocks of ``request`` after truncation, and the number of input tokens kept."""
    ids, length = request.hash_ids, request.input_length
    limit = truncation.max_tokens
    original = [(False, h) for h in ids]
    if limit is None or length <= limit or not ids:
        return original, length
    if truncation.mode == "tail":
        return _window(ids, length, length - limit, "tail", 0), limit
    head = min(truncation.head_blocks, limit // BLOCK_TOKENS - 1, len(ids))
    head = max(head, 0)
    head_tokens = head * BLOCK_TOKENS
    stride = truncation.stride or max(BLOCK_TOKENS, (limit // 4) // BLOCK_TOKENS * BLOCK_TOKENS)
    stride = max(BLOCK_TOKENS, stride // BLOCK_TOKENS * BLOCK_TOKENS)
    dropped = -(-(length - limit) // stride) * stride
    start = head_tokens + dropped
    if start >= length:
        return original[:head], head_tokens
    return original[:head] + _window(ids, length, start, "stable", head), length - dropped
