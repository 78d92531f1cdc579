"""SGLang page keys -> kvcore chunk keys.

SGLang names every page by a string (a chained SHA-256 of its tokens, in hex). kvcore keys it as
``namespace digest (8 bytes) + SHA-256(page key)[:16]``: the namespace pins model, KV dtype, page
byte layout, geometry, shard and tenant, so two SGLang deployments share pages only when every one
of those agrees, and a tenant never sees another tenant's pages.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from kvcore.keys import HASH_BYTES, ChunkKey, Namespace, tenant_salt

_PAGE_SALT = b"kvcore-sglang-page-v1"


@dataclass(frozen=True)
class ShardInfo:
    """The parts of SGLang's ``HiCacheStorageConfig`` that decide which KV shard a rank holds."""

    model: str
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    cp_rank: int = 0
    cp_size: int = 1
    rank_replicated: bool = False
    """MLA-style KV: every TP rank holds the same bytes, so the TP rank is not part of the key."""

    @classmethod
    def from_storage_config(cls, config: Any, model: str = "") -> ShardInfo:
        """Read an SGLang ``HiCacheStorageConfig`` (duck-typed: SGLang is not imported here)."""
        return cls(
            model=model or str(getattr(config, "model_name", None) or ""),
            tp_rank=int(getattr(config, "tp_rank", 0) or 0),
            tp_size=int(getattr(config, "tp_size", 1) or 1),
            pp_rank=int(getattr(config, "pp_rank", 0) or 0),
            pp_size=int(getattr(config, "pp_size", 1) or 1),
            cp_rank=int(getattr(config, "attn_cp_rank", 0) or 0),
            cp_size=int(getattr(config, "attn_cp_size", 1) or 1),
            rank_replicated=bool(getattr(config, "is_mla_model", False)),
        )


@dataclass(frozen=True)
class PageFormat:
    """What fixes the bytes of one stored page."""

    dtype: str = "unknown"
    layout: str = "unknown"
    """Host pool layout plus byte order of a page, for example ``page_first``."""
    geometry: str = ""
    """Pool class, layers, heads, head size, page size."""


def page_format_of(pool: Any, zero_copy: bool) -> PageFormat:
    """The page format of an SGLang host KV pool (``MHATokenToKVPoolHost`` and friends)."""
    layout = str(getattr(pool, "layout", "unknown"))
    if layout == "layer_first" and zero_copy:
        # v1 pages of a layer-first pool are per-layer (K, V) pieces, not the flat page.
        layout = "layer_first/v1"
    fields = [type(pool).__name__]
    for name in ("layer_num", "head_num", "head_dim", "v_head_dim", "kv_lora_rank",
                 "qk_rope_head_dim", "page_size"):
        value = getattr(pool, name, None)
        if isinstance(value, int):
            fields.append(f"{name}={value}")
    dtype = str(getattr(pool, "dtype", "unknown")).removeprefix("torch.")
    return PageFormat(dtype=dtype, layout=f"sglang:{layout}", geometry=",".join(fields))


def namespace_for(shard: ShardInfo, fmt: PageFormat, tenant: str = "") -> Namespace:
    """The kvcore namespace of one SGLang rank's pages."""
    shard_text = f"pp={shard.pp_rank}/{shard.pp_size};cp={shard.cp_rank}/{shard.cp_size}"
    geometry = f"{fmt.geometry};{shard_text}"
    return Namespace(
        model=shard.model,
        dtype=fmt.dtype,
        layout=fmt.layout,
        geometry=geometry,
        rank=0 if shard.rank_replicated else shard.tp_rank,
        world_size=1 if shard.rank_replicated else shard.tp_size,
        tenant=tenant,
    )


def page_key(namespace_digest: bytes, key: str, tenant: str = "") -> ChunkKey:
    """The kvcore key of SGLang page ``key`` under a namespace (of ``tenant``).

    The tenant salts the 128-bit page hash too, so tenants stay apart even where two
    namespace digests (64 bits) collide.
    """
    salt = _PAGE_SALT + tenant_salt(tenant) + b"\0" if tenant else _PAGE_SALT
    digest = hashlib.sha256(salt + key.encode("utf-8", "surrogatepass")).digest()
    return namespace_digest + digest[:HASH_BYTES]


def page_keys(namespace_digest: bytes, keys: list[str], tenant: str = "") -> list[ChunkKey]:
    return [page_key(namespace_digest, k, tenant) for k in keys]
