"""vLLM's KV event wire format, written by kvcore (``vllm.distributed.kv_events``).

A message is three ZMQ frames: the topic, the batch's sequence number (8 bytes, big-endian)
and the batch, msgpack-encoded by msgspec: ``[ts, [event, ...], data_parallel_rank]``, each
event a map tagged ``"type"``: ``BlockStored``, ``BlockRemoved`` or ``AllBlocksCleared``. The
structs below carry the fields vLLM's own structs always write, in vLLM's order, so vLLM's
classes (and the routers built on them) decode what kvcore publishes; the test suite decodes it
with vLLM's classes.
"""

from __future__ import annotations

import msgspec

BlockHash = bytes | int
"""A block hash as vLLM publishes it: bytes, or an int under VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES."""

END_SEQ = (-1).to_bytes(8, "big", signed=True)
"""Sequence frame that ends a replay (vLLM's marker)."""


class BlockStored(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    """Blocks that entered ``medium``: their hashes, the hash of the block before the first,
    their tokens and the engine's block size."""

    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None


class BlockRemoved(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    """Blocks that left ``medium``."""

    block_hashes: list[BlockHash]
    medium: str | None


class AllBlocksCleared(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    """Everything was removed (kvcore does not send it: a clear is announced block by block)."""


Event = BlockStored | BlockRemoved | AllBlocksCleared


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One published message's payload."""

    ts: float
    events: list[Event]
    data_parallel_rank: int | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(EventBatch)


def encode(batch: EventBatch) -> bytes:
    return _encoder.encode(batch)


def decode(payload: bytes) -> EventBatch:
    """Decode one payload; raise :class:`msgspec.DecodeError` on anything else (tests, tools)."""
    return _decoder.decode(payload)


def medium_of(tier: str) -> str:
    """The medium a tier publishes as: its name in capitals (``cpu`` -> ``CPU``, vLLM's name
    for host memory; ``lmdb``, ``redis``, ``nixl_peer`` keep theirs)."""
    return tier.upper()
