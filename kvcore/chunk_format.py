"""The stored form of a chunk in tiers below memory: a 56-byte header, then the payload.

    offset size field
    0      4    magic b"KVC1"
    4      2    format version: 1 raw payload, 2 encoded payload
    6      2    flags: 0 (v1); the codec name's length in bytes (v2)
    8      24   chunk key (namespace digest + chained hash): foreign data never matches
    32     4    token count
    36     4    reserved 0 (v1); the raw (decoded) length in bytes (v2)
    40     8    payload length
    48     8    XXH3-64 of bytes 0..47 and the payload

A version-2 payload is the codec's name (ASCII) followed by the encoded bytes; the checksum
covers both, so what the tier stored is verified before any decoder sees it. Raw chunks stay
version 1, byte for byte what older kvcore writes, and an older reader refuses an encoded chunk
(wrong version: a miss, never garbage).

:func:`open_frame` returns the verified parts only when every field matches the expected key and
the checksum verifies; anything else (truncated, flipped, foreign, unknown version) is ``None``
and the caller treats it as a miss.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

from kvcore.interfaces import Buffer
from kvcore.keys import KEY_BYTES, ChunkKey

MAGIC = b"KVC1"
VERSION = 1
CODED_VERSION = 2
RAW_CODEC = "none"
MAX_CODEC_NAME = 64
MAX_CODED_RAW_BYTES = 2**32 - 1
"""The largest raw chunk an encoded frame can describe (its raw length is 32 bits)."""
_HEAD = struct.Struct("<4sHH24sIIQ")
_SUM = struct.Struct("<Q")
HEADER_BYTES = _HEAD.size + _SUM.size
assert HEADER_BYTES == 56


@dataclass(frozen=True)
class Frame:
    """A verified frame: the codec that encoded ``data`` (``"none"``: ``data`` is raw) and the
    length of the raw bytes it decodes to."""

    codec: str
    data: memoryview
    raw_nbytes: int


def checksum(head: bytes, *parts: Buffer) -> int:
    hasher = xxhash.xxh3_64()
    hasher.update(head)
    for part in parts:
        hasher.update(part)
    return hasher.intdigest()


def _check_key(key: ChunkKey) -> None:
    if len(key) != KEY_BYTES:
        raise ValueError(f"chunk key must be {KEY_BYTES} bytes")


def encode(key: ChunkKey, payload: Buffer, tokens: int = 0) -> list[Buffer]:
    """The framed raw value as parts ``[header, payload]`` (no copy of the payload)."""
    _check_key(key)
    view = memoryview(payload).cast("B")
    head = _HEAD.pack(MAGIC, VERSION, 0, key, tokens, 0, view.nbytes)
    return [head + _SUM.pack(checksum(head, view)), view]


def encode_coded(key: ChunkKey, codec: str, encoded: Buffer, raw_nbytes: int,
                 tokens: int = 0) -> list[Buffer]:
    """The framed value of bytes ``codec`` encoded from ``raw_nbytes`` raw bytes, as parts
    ``[header + codec name, encoded]``."""
    _check_key(key)
    name = codec.encode("ascii")
    if not 0 < len(name) <= MAX_CODEC_NAME or codec == RAW_CODEC:
        raise ValueError(f"codec name {codec!r}: 1 to {MAX_CODEC_NAME} ASCII characters, "
                         f"not {RAW_CODEC!r}")
    if not 0 < raw_nbytes <= MAX_CODED_RAW_BYTES:
        raise ValueError(f"an encoded frame holds at most {MAX_CODED_RAW_BYTES} raw bytes")
    view = memoryview(encoded).cast("B")
    head = _HEAD.pack(MAGIC, CODED_VERSION, len(name), key, tokens, raw_nbytes,
                      len(name) + view.nbytes)
    return [head + _SUM.pack(checksum(head, name, view)) + name, view]


def open_frame(key: ChunkKey, blob: Buffer | None) -> Frame | None:
    """The verified contents of a framed value if it is intact and belongs to ``key``."""
    if blob is None:
        return None
    view = memoryview(blob).cast("B")
    if view.nbytes < HEADER_BYTES:
        return None
    head = bytes(view[: _HEAD.size])
    magic, version, flags, stored_key, _tokens, reserved, length = _HEAD.unpack(head)
    if magic != MAGIC or stored_key != key or view.nbytes - HEADER_BYTES != length:
        return None
    payload = view[HEADER_BYTES:]
    (stored_sum,) = _SUM.unpack(view[_HEAD.size : HEADER_BYTES])
    if version == VERSION and flags == 0 and reserved == 0:
        if checksum(head, payload) != stored_sum:
            return None
        return Frame(RAW_CODEC, payload, payload.nbytes)
    if version != CODED_VERSION or not 0 < flags <= min(MAX_CODEC_NAME, length) or not reserved:
        return None
    if checksum(head, payload) != stored_sum:
        return None
    try:
        codec = bytes(payload[:flags]).decode("ascii")
    except UnicodeDecodeError:
        return None
    if codec == RAW_CODEC:
        return None
    return Frame(codec, payload[flags:], reserved)


def decode(key: ChunkKey, blob: Buffer | None) -> memoryview | None:
    """The payload of a raw (version-1) framed value if it is intact and belongs to ``key``,
    else ``None`` (an encoded value needs its codec: :func:`open_frame`)."""
    frame = open_frame(key, blob)
    return frame.data if frame is not None and frame.codec == RAW_CODEC else None


def matches(key: ChunkKey, header: Buffer, payload: Buffer) -> bool:
    """Whether ``header`` frames raw ``payload`` under ``key``: magic, version, key, length and
    checksum all verify (for a frame whose parts arrive apart, such as a NIXL peer's read)."""
    head_view = memoryview(header).cast("B")
    if head_view.nbytes != HEADER_BYTES:
        return False
    head = bytes(head_view[: _HEAD.size])
    magic, version, flags, stored_key, _tokens, reserved, length = _HEAD.unpack(head)
    if (magic != MAGIC or version != VERSION or flags or reserved or stored_key != key):
        return False
    payload_view = memoryview(payload).cast("B")
    if payload_view.nbytes != length:
        return False
    (stored_sum,) = _SUM.unpack(head_view[_HEAD.size :])
    return checksum(head, payload_view) == stored_sum
