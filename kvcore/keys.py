"""Chunk keys: a namespace plus a chained hash of token ids.

A key is 24 bytes: the first 8 are the namespace digest, the last 16 a hash chained over the
token ids of the chunk and every chunk before it. The chain starts from a root salted with the
namespace's tenant, so two tenants are separated by the 128-bit chained hash, not only by the
64-bit namespace digest (a tenant who found a namespace digest equal to another's still never
matches its keys). The shared tenant (``""``) keeps the unsalted root. The same tokens under
the same namespace give the same key in every process, on every machine, after every restart:
the hash is SHA-256 (truncated to 128 bits) over the little-endian uint32 token ids, never
Python's ``hash``.

SHA-256 was chosen by measurement (``bench/bench_hash.py``): with the SHA extensions of current
x86 and Arm CPUs it hashes a 128K-token prompt in about half a millisecond here, faster than
BLAKE2b, and, being cryptographic, a tenant cannot craft a collision with another's prefix.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

ChunkKey = bytes
"""24 bytes: namespace digest (8) + chained chunk hash (16)."""

NAMESPACE_BYTES = 8
HASH_BYTES = 16
KEY_BYTES = NAMESPACE_BYTES + HASH_BYTES
_ROOT = b"kvcore-chunk-chain-v1".ljust(HASH_BYTES, b"\0")[:HASH_BYTES]
_TENANT_ROOT = b"kvcore-chunk-chain-v2/tenant\0"


def tenant_salt(tenant: str) -> bytes:
    """Bytes that salt a hash with ``tenant`` (empty for the shared tenant ``""``)."""
    if not tenant:
        return b""
    return b"\0tenant\0" + tenant.encode("utf-8", "surrogatepass")


def chain_root(tenant: str = "") -> bytes:
    """The first link of the chained hash: per tenant, so tenants never share a chain."""
    if not tenant:
        return _ROOT
    return hashlib.sha256(_TENANT_ROOT + tenant.encode("utf-8", "surrogatepass")).digest()[
        :HASH_BYTES]


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

    def with_tenant(self, tenant: str | None) -> Namespace:
        """Same namespace for another tenant (``None`` or ``""`` is the shared tenant)."""
        values = asdict(self)
        values["tenant"] = tenant or ""
        return Namespace(**values)


def token_bytes(tokens: Sequence[int] | np.ndarray) -> bytes:
    """Token ids as little-endian uint32 bytes (the input of the chunk hash).

    Only integers are token ids: a float (``1.7``, even ``1.0``), a bool or a string raises
    TypeError instead of being truncated into another token's key.
    """
    array = np.asarray(tokens)
    if array.size == 0:
        return b""
    if array.dtype == object:  # Python ints beyond int64, or mixed types
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool)
                   for t in array.ravel()):
            raise TypeError("token ids must be integers (got a non-integer value)")
        if any(t < 0 or t > 0xFFFFFFFF for t in array.ravel()):
            raise ValueError("token ids must be in 0..2**32-1")
        array = array.astype(np.uint64)
    elif not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"token ids must be integers, not {array.dtype} values")
    if array.min() < 0 or array.max() > 0xFFFFFFFF:
        raise ValueError("token ids must be in 0..2**32-1")
    return array.astype("<u4", copy=False).tobytes()


def chunk_keys(
    namespace: Namespace | bytes,
    tokens: Sequence[int] | np.ndarray,
    chunk_size: int,
    tenant: str | None = None,
) -> list[ChunkKey]:
    """Keys of every *full* chunk of ``tokens``, in order. A trailing partial chunk has no key.

    ``namespace`` is a :class:`Namespace` (its tenant salts the chain) or an 8-byte digest;
    with a digest, pass the namespace's ``tenant`` too (default: the shared tenant).
    """
    if isinstance(namespace, Namespace):
        if tenant is not None and tenant != namespace.tenant:
            raise ValueError("tenant differs from the namespace's tenant")
        ns, tenant = namespace.digest, namespace.tenant
    else:
        ns = namespace
    if len(ns) != NAMESPACE_BYTES:
        raise ValueError(f"namespace digest must be {NAMESPACE_BYTES} bytes")
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    data = token_bytes(tokens)
    step = chunk_size * 4
    full = len(data) // step
    keys: list[ChunkKey] = []
    prev = chain_root(tenant or "")
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
