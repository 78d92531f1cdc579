"""What an instance does when the controller asks: clear, pin, unpin, export/import/delete
chunks of one tier, copy between its own tiers. Each op takes JSON args, returns a JSON dict."""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from typing import Any

from kvcore.engine import CacheEngine
from kvcore.keys import ChunkKey, chunk_keys

Op = Callable[[CacheEngine, dict[str, Any]], dict[str, Any]]


class CommandError(ValueError):
    """The command cannot be done as asked (the message goes back to the caller)."""


def _keys(engine: CacheEngine, args: dict[str, Any]) -> list[ChunkKey]:
    namespace = bytes.fromhex(args["namespace"])
    return chunk_keys(namespace, args["tokens"], engine.chunk_size, tenant=args.get("tenant") or "")


def _lower(engine: CacheEngine, tier: str) -> Any:
    for lower in engine.lower:
        if lower.name == tier:
            return lower
    names = ", ".join(t.name for t in engine.tiers)
    raise CommandError(f"no tier {tier!r} here; tiers: {names}")


def read_leading(engine: CacheEngine, tier: str, keys: Sequence[ChunkKey],
                 max_bytes: int | None = None) -> list[tuple[ChunkKey, bytes]]:
    """The leading run of ``keys`` held in ``tier``, with their payloads. A chunk that came
    through a lossy codec ends the run: its bytes are not the KV that was computed, and a copy
    elsewhere would pass them off as exact."""
    lossy: list[bool]
    if tier == engine.memory.name:
        values: Sequence[Any] = engine.memory.get(keys)
        lossy = [engine.codecs.loaded_codec(k) is not None for k in keys]
    else:
        found = _lower(engine, tier).get_decoded(keys)
        values = [f[0] if f is not None else None for f in found]
        lossy = [f is not None and _is_lossy(engine, f[1]) for f in found]
    out, total = [], 0
    for key, value, from_lossy in zip(keys, values, lossy):
        if value is None or from_lossy:
            break
        payload = bytes(value)
        total += len(payload)
        if max_bytes is not None and total > max_bytes:
            raise CommandError(f"prefix is over the transfer limit of {max_bytes} bytes "
                               "(KVCORE_CONTROLLER_MAX_TRANSFER_BYTES)")
        out.append((key, payload))
    return out


def _is_lossy(engine: CacheEngine, codec: str) -> bool:
    found = engine.codecs.by_name(codec)
    return found is not None and found.lossy


def write_chunks(engine: CacheEngine, tier: str, items: Sequence[tuple[ChunkKey, bytes]]) -> int:
    """Store chunks (a prefix, in order) into ``tier``; return how many it now holds."""
    if not items:
        return 0
    if tier == engine.memory.name:
        keys = [k for k, _ in items]
        present = engine.memory.contains(keys)
        count = 0
        for i, ((key, payload), here) in enumerate(zip(items, present)):
            if here or engine.memory.put_one(key, [payload], keys[i - 1] if i else None):
                count += 1
        return count
    lower = _lower(engine, tier)
    return lower.put([(k, memoryview(p)) for k, p in items], engine.chunk_size)


def delete_chunks(engine: CacheEngine, tier: str, keys: Sequence[ChunkKey]) -> int:
    """Remove chunks from one tier (pinned ones too)."""
    keys = list(keys)
    if tier == engine.memory.name:
        engine.memory.unpin(keys)
        removed = engine.memory.delete(keys)
    else:
        lower = _lower(engine, tier)
        lower.call("unpin", lower.tier.unpin, keys, default=0)
        removed = int(lower.call("delete", lower.tier.delete, keys, default=0))
    engine.history.note(tier, "deleted", keys)
    return removed


def op_clear(engine: CacheEngine, args: dict[str, Any]) -> dict[str, Any]:
    ns = bytes.fromhex(args["namespace"]) if args.get("namespace") else None
    tier = args.get("tier")
    if tier is not None and tier not in [t.name for t in engine.tiers]:
        raise CommandError(f"no tier {tier!r} here")
    return {"removed": engine.clear(ns, tier)}


def op_pin(engine: CacheEngine, args: dict[str, Any]) -> dict[str, Any]:
    return {"chunks": engine.pin(_keys(engine, args))}


def op_unpin(engine: CacheEngine, args: dict[str, Any]) -> dict[str, Any]:
    return {"chunks": engine.unpin(_keys(engine, args))}


def op_export(engine: CacheEngine, args: dict[str, Any]) -> dict[str, Any]:
    items = read_leading(engine, args["tier"], _keys(engine, args), args.get("max_bytes"))
    if not items:
        raise CommandError("the prefix is not cached in that tier")
    return {"keys": [k.hex() for k, _ in items],
            "chunks": [base64.b64encode(p).decode() for _, p in items]}


def op_import(engine: CacheEngine, args: dict[str, Any]) -> dict[str, Any]:
    keys = [bytes.fromhex(k) for k in args["keys"]]
    payloads = [base64.b64decode(c, validate=True) for c in args["chunks"]]
    if len(keys) != len(payloads):
        raise CommandError("keys and chunks differ in number")
    stored = write_chunks(engine, args["tier"], list(zip(keys, payloads)))
    if stored < len(keys):
        raise CommandError(f"stored {stored} of {len(keys)} chunks (tier full?)")
    return {"stored": stored}


def op_delete(engine: CacheEngine, args: dict[str, Any]) -> dict[str, Any]:
    return {"removed": delete_chunks(engine, args["tier"], [bytes.fromhex(k)
                                                            for k in args["keys"]])}


def op_copy_tiers(engine: CacheEngine, args: dict[str, Any]) -> dict[str, Any]:
    items = read_leading(engine, args["source_tier"], _keys(engine, args))
    if not items:
        raise CommandError("the prefix is not cached in the source tier")
    stored = write_chunks(engine, args["target_tier"], items)
    if stored < len(items):
        raise CommandError(f"stored {stored} of {len(items)} chunks (tier full?)")
    if args.get("delete_source"):
        delete_chunks(engine, args["source_tier"], [k for k, _ in items])
    return {"keys": [k.hex() for k, _ in items]}


MAX_RECORDS = 1000
"""Request records one ``requests`` command returns at most."""


def op_requests(engine: CacheEngine, args: dict[str, Any]) -> dict[str, Any]:
    """The record of request ``id``, or the newest ``limit`` records."""
    if args.get("id") is not None:
        record = engine.requests.get(str(args["id"]))
        return {"records": [record.as_dict()] if record is not None else []}
    limit = min(MAX_RECORDS, max(0, int(args.get("limit", 20))))
    return {"records": [r.as_dict() for r in engine.requests.recent(limit)]}


OPS: dict[str, Op] = {
    "clear": op_clear,
    "pin": op_pin,
    "unpin": op_unpin,
    "export": op_export,
    "import": op_import,
    "delete": op_delete,
    "copy_tiers": op_copy_tiers,
    "requests": op_requests,
}


def run_command(engine: CacheEngine, op: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run one command; raise :class:`CommandError` (or any error) when it fails."""
    if op not in OPS:
        raise CommandError(f"unknown command {op!r}")
    return OPS[op](engine, args)
