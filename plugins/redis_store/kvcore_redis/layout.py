"""How a chunk is laid out in Redis: key names, and large values split into parts.

A chunk is stored under ``<prefix>{<48 hex digits of the chunk key>}``. The braces are a Redis
Cluster hash tag: the parts of a large value (``...}:0``, ``...}:1``, ...) live in the same slot,
on the same node, as their manifest. A small value is the key's value as is; a value larger than
``part_size``, or one that would waste memory in the server's allocator, is cut into parts and the
key holds a 32-byte manifest.

Why the allocator matters: Redis allocates with jemalloc, whose size classes above 16 KiB are
spaced a quarter of a power of two apart. A framed chunk is a power-of-two payload plus a 56-byte
header, so stored whole it lands just above a class boundary: a 4 MiB chunk takes 5 MiB of server
memory. Parts of a power of two minus 64 bytes (room for Redis's own string header) fill their
allocations exactly, and the header spills into a small last part.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from kvcore.interfaces import Buffer
from kvcore.keys import KEY_BYTES, ChunkKey

MANIFEST_MAGIC = b"KVRM"
_MANIFEST = struct.Struct("<4sHHIQQ4x")
MANIFEST_BYTES = _MANIFEST.size
SMALL_VALUE = 64 * 1024
"""Values up to this size are always stored whole."""
REDIS_OVERHEAD = 64
"""Bytes a piece leaves free in its allocation for Redis's string header."""
_WASTE = 1.04
_MAX_PART = 512 * 1024**2
"""Redis's proto-max-bulk-len default: no part can be larger."""


def allocation(nbytes: int) -> int:
    """jemalloc's size class for ``nbytes`` (four classes per power of two above 16 KiB)."""
    if nbytes <= 16 * 1024:
        return nbytes
    spacing = 1 << ((nbytes - 1).bit_length() - 3)
    return -(-nbytes // spacing) * spacing


def piece_size(total: int, part_size: int) -> int | None:
    """Bytes per part for a value of ``total`` bytes, or None to store it whole."""
    if total <= SMALL_VALUE:
        return None
    if total <= part_size and allocation(total + 16) <= total * _WASTE:
        return None
    return min(part_size, 1 << (total.bit_length() - 1)) - REDIS_OVERHEAD


@dataclass(frozen=True)
class Manifest:
    """A split value: ``parts`` keys of ``part_size`` bytes (the last may be shorter)."""

    parts: int
    total: int
    part_size: int

    def encode(self) -> bytes:
        return _MANIFEST.pack(MANIFEST_MAGIC, 1, 0, self.parts, self.total, self.part_size)

    def part_length(self, index: int) -> int:
        return min(self.part_size, self.total - index * self.part_size)

    def valid(self, max_total: int) -> bool:
        """Whether a reader may act on this manifest: more than a small value (which is never
        split) and at most ``max_total`` bytes, in parts as :meth:`decode` checks them."""
        return (SMALL_VALUE < self.total <= max_total and 0 < self.part_size <= _MAX_PART
                and self.parts == -(-self.total // self.part_size))

    @staticmethod
    def decode(value: bytes | bytearray) -> Manifest | None:
        """The manifest if ``value`` is one, else None (a plain value)."""
        if len(value) != MANIFEST_BYTES or not value.startswith(MANIFEST_MAGIC):
            return None
        _magic, version, _flags, parts, total, part_size = _MANIFEST.unpack(value)
        if version != 1 or not 0 < part_size <= _MAX_PART or parts != -(-total // part_size):
            return None  # not ours (or damaged): never allocate what a stray value claims
        return Manifest(parts, total, part_size)


class Naming:
    """Key names under a prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix.encode()

    def chunk(self, key: ChunkKey) -> bytes:
        return b"%s{%s}" % (self.prefix, key.hex().encode())

    @staticmethod
    def part(name: bytes, index: int) -> bytes:
        return b"%s:%d" % (name, index)

    def pattern(self) -> bytes:
        """SCAN pattern matching chunk keys (not their parts)."""
        escaped = bytes(
            c for b in self.prefix for c in ((92, b) if b in b"*?[]\\" else (b,))
        )
        return escaped + b"{*}"

    def key_of(self, name: bytes) -> ChunkKey | None:
        """The chunk key of a chunk key name, or None for anything else."""
        body = name[len(self.prefix):]
        if not name.startswith(self.prefix) or len(body) != 2 * KEY_BYTES + 2:
            return None
        try:
            return bytes.fromhex(body[1:-1].decode())
        except ValueError:
            return None


def split(parts: Sequence[Buffer], size: int) -> Iterator[list[memoryview]]:
    """The concatenation of ``parts`` cut into pieces of ``size`` bytes (the last may be shorter).

    Each piece is a list of views into ``parts``: nothing is copied.
    """
    piece: list[memoryview] = []
    piece_len = 0
    for part in parts:
        view = memoryview(part).cast("B")
        offset = 0
        while offset < view.nbytes:
            take = min(size - piece_len, view.nbytes - offset)
            piece.append(view[offset:offset + take])
            piece_len += take
            offset += take
            if piece_len == size:
                yield piece
                piece, piece_len = [], 0
    if piece_len:
        yield piece
