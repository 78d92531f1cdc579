"""Chunk keys for trace blocks.

The hash ids of a trace are already prefix-chained, so the key of block ``h`` is derived from
``h`` alone within one namespace: 8 bytes of namespace digest, then the first 16 bytes of
SHA-256 over a tag and ``h`` (the same in every process). Truncated requests get fresh ids
from :mod:`kvcore.trace.truncate`, in a separate id space (``derived=True``).
"""

from __future__ import annotations

import hashlib

from kvcore.keys import ChunkKey, Namespace

TRACE_NAMESPACE = Namespace(model="trace-replay", layout="trace")


class BlockKeys:
    """Maps block ids to chunk keys, caching each key once made."""

    def __init__(self, namespace: Namespace = TRACE_NAMESPACE) -> None:
        self._ns = namespace.digest
        self._cache: dict[tuple[bool, int], ChunkKey] = {}

    def key(self, block_id: int, derived: bool = False) -> ChunkKey:
        """The chunk key of ``block_id`` (original ids, or ids made by truncation)."""
        slot = (derived, block_id)
        key = self._cache.get(slot)
        if key is None:
            tag = b"kvcore-trace-derived" if derived else b"kvcore-trace-block"
            digest = hashlib.sha256(tag + block_id.to_bytes(16, "little")).digest()
            key = self._ns + digest[:16]
            self._cache[slot] = key
        return key
