"""What the scheduler side tells the worker side each step (vLLM's KVConnectorMetadata)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)


@dataclass
class LoadSpec:
    """Load chunks ``keys`` into ``block_ids`` (``blocks_per_chunk`` per chunk, in order).

    The first ``skip_blocks`` blocks of the first chunk are already computed by vLLM (its own
    prefix cache) and are not written; their ids are absent from ``block_ids``.
    """

    req_id: str
    keys: list[bytes]
    block_ids: list[int]
    skip_blocks: int = 0
    tenant: str = ""
    """The request's cache_salt: workers of other ranks re-derive the keys' namespace from it."""


@dataclass
class StoreSpec:
    """Store chunks ``keys`` from ``block_ids`` (``blocks_per_chunk`` per chunk, in order)."""

    req_id: str
    keys: list[bytes]
    block_ids: list[int]
    tenant: str = ""


@dataclass
class KVCoreMetadata(KVConnectorMetadata):
    """One step's loads, stores and preempted requests."""

    loads: list[LoadSpec] = field(default_factory=list)
    stores: list[StoreSpec] = field(default_factory=list)
    preempted: set[str] = field(default_factory=set)


@dataclass
class KVCoreWorkerMeta(KVConnectorWorkerMetadata):
    """Worker -> scheduler, each step: chunks that entered or left the worker's CPU tier.

    Used when the worker runs in another process than the scheduler (vLLM's multiprocess
    executor): the scheduler keeps a mirror of the worker's CPU-tier keys for its lookups. Keys
    are in rank 0's namespace. ``events`` is ordered: ``(True, keys)`` admitted, ``(False, keys)``
    evicted or deleted.
    """

    events: list[tuple[bool, list[bytes]]] = field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> "KVCoreWorkerMeta":
        # Several ranks: admissions as the first rank reports them, evictions from every rank
        # (a chunk one rank lost is no hit; a rank missing a shard reports a load error).
        if isinstance(other, KVCoreWorkerMeta):
            removed = [(False, keys) for admitted, keys in other.events if not admitted]
            return KVCoreWorkerMeta(self.events + removed)
        return self
