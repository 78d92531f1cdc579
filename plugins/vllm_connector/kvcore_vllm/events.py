"""KV events under vLLM's own block hashes: the labels the scheduler side gives kvcore's event
publisher (:mod:`kvcore.events`) for a request's chunks, so that a router indexing vLLM's events
finds kvcore's copies of the same blocks under the same hashes (docs/kv-events.md)."""

from __future__ import annotations

from typing import Any

from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from kvcore.events.publisher import ChunkLabel


def _block_hashes(request: Any, hash_block_size: int, block_size: int) -> Any:
    """The request's block hashes at ``block_size`` (vLLM may hash at a finer size)."""
    if hash_block_size == block_size:
        return request.block_hashes
    from vllm.v1.core.kv_cache_utils import resolve_block_hashes

    return resolve_block_hashes(request.block_hashes, hash_block_size, block_size)


def chunk_labels(request: Any, chunks: int, block_size: int, blocks_per_chunk: int,
                 hash_block_size: int | None = None) -> list[ChunkLabel]:
    """Labels of the request's first ``chunks`` chunks, each chunk ``blocks_per_chunk`` of
    vLLM's blocks: their hashes as vLLM publishes them (``maybe_convert_block_hash``), the
    hash of the block before, the chunk's tokens. Stops at the first chunk vLLM has not
    hashed in full (prefix caching off: no labels)."""
    hashes = _block_hashes(request, hash_block_size or block_size, block_size)
    tokens = request.prompt_token_ids or []
    lora = getattr(request, "lora_request", None)
    lora_name = getattr(lora, "lora_name", None) if lora is not None else None
    chunk_tokens = block_size * blocks_per_chunk
    labels: list[ChunkLabel] = []
    for i in range(chunks):
        lo, hi = i * blocks_per_chunk, (i + 1) * blocks_per_chunk
        if len(hashes) < hi:
            break
        parent = maybe_convert_block_hash(hashes[lo - 1]) if lo else None
        labels.append(ChunkLabel(tuple(maybe_convert_block_hash(hashes[b]) for b in range(lo, hi)),
                                 parent, tuple(tokens[i * chunk_tokens:(i + 1) * chunk_tokens]),
                                 block_size, lora_name))
    return labels
