"""Chunk keys: a namespace plus a chained hash of token ids.

A key is 24 bytes: the first 8 are the namespace digest, the last 16 a hash chained over the
token ids of the chunk and every chunk before it. The same tokens under the same namespace give
the same key in every process, on every machine, after every restart: the hash is SHA-256
(truncated to 128 bits) over the little-endian uint32 token ids, never Python's ``hash``.

SHA-256 was chosen by measurement (``bench/bench_hash.py``): with the SHA extensions of current
x86 and Arm CPUs it hashes a 128K-token prompt in about half a millisecond here, faster than
BLAKE2b, and, being cryptographic, a tenant cannot craft a collision with another's prefix.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

ChunkKey = bytes
"""24 bytes: namespace digest (8) + chained chunk hash (16)."""

NAMESPACE_BYTES = 8
HASH_BYTES = 16
KEY_BYTES = NAMESPACE_BYTES + HASH_BYTES
_ROOT = b"kvcore-chunk-chain-v1".ljust(HASH_BYTES, b"\0")[:HASH_BYTES]


@dataclass(frozen=True)
class Namespace:
    """Everything that makes KV bytes incompatible or private.

    Two engines share chunks only when every field is equal.
    """

    model: str
    """Model identity: name or path plus revision (weights that differ must not share KV)."""
    dtype: str = "bfloat16"
    """KV cache dtype."""
    layout: str = "opaque"
    """KV layout name, for example ``vllm-cpu`` or ``vllm-flash``."""
    geometry: str = ""
    """Layer count, KV heads, head size, block size: whatever fixes the byte shape."""
    rank: int = 0
    """Parallel rank (tensor/pipeline) whose shard of the KV this is."""
    world_size: int = 1
    tenant: str = ""
    """Tenant salt: chunks of different tenants never match."""

    def canonical(self) -> bytes:
        """Stable byte form: sorted JSON of all fields."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @property
    def digest(self) -> bytes:
        """8-byte namespace id that prefixes every key of this namespace."""
        return hashlib.sha256(b"kvcore-namespace-v1" + self.canonical()).digest()[:NAMESPACE_BYTES]

    def with_tenant(self, tenant: str | None) -> "Namespace":
        """Same namespace for another tenant (``None`` or ``""`` is the shared tenant)."""
        values = asdict(self)
        values["tenant"] = tenant or ""
        return Namespace(**values)


def token_bytes(tokens: Sequence[int] | np.ndarray) -> bytes:
    """Token ids as little-endian uint32 bytes (the input of the chunk hash)."""
    array = np.asarray(tokens)
    if array.size and (array.min() < 0 or array.max() > 0xFFFFFFFF):
        raise ValueError("token ids must be in 0..2**32-1")
    return array.astype("<u4", copy=False).tobytes()


def chunk_keys(
    namespace: Namespace | bytes,
    tokens: Sequence[int] | np.ndarray,
    chunk_size: int,
) -> list[ChunkKey]:
    """Keys of every *full* chunk of ``tokens``, in order. A trailing partial chunk has no key."""
    ns = namespace.digest if isinstance(namespace, Namespace) else namespace
    if len(ns) != NAMESPACE_BYTES:
        raise ValueError(f"namespace digest must be {NAMESPACE_BYTES} bytes")
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    data = token_bytes(tokens)
    step = chunk_size * 4
    full = len(data) // step
    keys: list[ChunkKey] = []
    prev = _ROOT
    sha = hashlib.sha256
    view = memoryview(data)
    for i in range(full):
        hasher = sha(prev)
        hasher.update(view[i * step : (i + 1) * step])
        prev = hasher.digest()[:HASH_BYTES]
        keys.append(ns + prev)
    return keys


def key_namespace(key: ChunkKey) -> bytes:
    """The 8-byte namespace digest of a key."""
    return key[:NAMESPACE_BYTES]


def key_hex(key: ChunkKey) -> str:
    """Printable form of a key (``<namespace>-<hash>``)."""
    return f"{key[:NAMESPACE_BYTES].hex()}-{key[NAMESPACE_BYTES:].hex()}"
