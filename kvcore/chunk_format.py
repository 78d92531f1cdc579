"""The stored form of a chunk in tiers below memory: a 56-byte header, then the payload.

    offset size field
    0      4    magic b"KVC1"
    4      2    format version (1)
    6      2    flags (0)
    8      24   chunk key (namespace digest + chained hash): foreign data never matches
    32     4    token count
    36     4    reserved (0)
    40     8    payload length
    48     8    XXH3-64 of bytes 0..47 and the payload

:func:`decode` returns the payload only when every field matches the expected key and the
checksum verifies; anything else (truncated, flipped, foreign, older format) is ``None`` and the
caller treats it as a miss.
"""

from __future__ import annotations

import struct

import xxhash

from kvcore.interfaces import Buffer
from kvcore.keys import KEY_BYTES, ChunkKey

MAGIC = b"KVC1"
VERSION = 1
_HEAD = struct.Struct("<4sHH24sIIQ")
_SUM = struct.Struct("<Q")
HEADER_BYTES = _HEAD.size + _SUM.size
assert HEADER_BYTES == 56


def checksum(head: bytes, payload: Buffer) -> int:
    hasher = xxhash.xxh3_64()
    hasher.update(head)
    hasher.update(payload)
    return hasher.intdigest()


def encode(key: ChunkKey, payload: Buffer, tokens: int = 0) -> list[Buffer]:
    """The framed value as parts ``[header, payload]`` (no copy of the payload)."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"chunk key must be {KEY_BYTES} bytes")
    view = memoryview(payload).cast("B")
    head = _HEAD.pack(MAGIC, VERSION, 0, key, tokens, 0, view.nbytes)
    return [head + _SUM.pack(checksum(head, view)), view]


def decode(key: ChunkKey, blob: Buffer | None) -> memoryview | None:
    """The payload of a framed value if it is intact and belongs to ``key``, else ``None``."""
    if blob is None:
        return None
    view = memoryview(blob).cast("B")
    if view.nbytes < HEADER_BYTES:
        return None
    payload = view[HEADER_BYTES:]
    return payload if matches(key, view[:HEADER_BYTES], payload) else None


def matches(key: ChunkKey, header: Buffer, payload: Buffer) -> bool:
    """Whether ``header`` frames ``payload`` under ``key``: magic, version, key, length and
    checksum all verify (for a frame whose parts arrive apart, such as a NIXL peer's read)."""
    head_view = memoryview(header).cast("B")
    if head_view.nbytes != HEADER_BYTES:
        return False
    head = bytes(head_view[: _HEAD.size])
    magic, version, _flags, stored_key, _tokens, _res, length = _HEAD.unpack(head)
    if magic != MAGIC or version != VERSION or stored_key != key:
        return False
    payload_view = memoryview(payload).cast("B")
    if payload_view.nbytes != length:
        return False
    (stored_sum,) = _SUM.unpack(head_view[_HEAD.size :])
    return checksum(head, payload_view) == stored_sum
