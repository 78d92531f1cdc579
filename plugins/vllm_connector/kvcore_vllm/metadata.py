"""What the scheduler side tells the worker side each step (vLLM's KVConnectorMetadata), and
what the worker tells the scheduler back (vLLM's KVConnectorWorkerMetadata)."""

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
    prefix cache) and are not written; their ids are absent from ``block_ids``. The last chunk
    may be loaded in part: ``block_ids`` then ends before it does (a prompt of whole chunks
    leaves its last block to compute, as vLLM's own prefix cache does).
    """

    req_id: str
    keys: list[bytes]
    block_ids: list[int]
    skip_blocks: int = 0
    tenant: str = ""
    """The request's cache_salt: workers of other ranks re-derive the keys' namespace from it."""
    is_async: bool = False
    """Loaded in the background while the batch runs; the request waits in vLLM's
    WAITING_FOR_REMOTE_KVS until the worker reports it received."""
    first_chunk: int = 0
    """Index of ``keys[0]`` in the request's prompt (for reporting failures back)."""


@dataclass
class StoreSpec:
    """Store chunks ``keys`` from ``block_ids`` (``blocks_per_chunk`` per chunk, in order).

    ``context_block_ids`` are the request's blocks before the stored ones: the stored KV was
    computed over them, so a store whose context holds a block that failed to load this step
    is dropped (its KV was computed over a wrong context).
    """

    req_id: str
    keys: list[bytes]
    block_ids: list[int]
    tenant: str = ""
    context_block_ids: list[int] = field(default_factory=list)
    first_chunk: int = 0
    """Index of ``keys[0]`` in the request's prompt."""
    verify_only: bool = False
    """Sampled for verification (``KVCORE_VERIFY_SAMPLE``): compare the KV vLLM computed with
    what kvcore holds under ``keys`` instead of storing it."""


@dataclass
class KVCoreMetadata(KVConnectorMetadata):
    """One step's loads, stores and preempted requests."""

    loads: list[LoadSpec] = field(default_factory=list)
    stores: list[StoreSpec] = field(default_factory=list)
    preempted: set[str] = field(default_factory=set)
    step: list[tuple[int, int]] = field(default_factory=list)
    """``(tokens computed before, tokens scheduled)`` of each request this step: the worker
    times the step and feeds kvcore's planner (its model of recomputing)."""


@dataclass
class KVCoreWorkerMeta(KVConnectorWorkerMetadata):
    """Worker -> scheduler, each step.

    ``events``: chunks that entered or left the worker's CPU tier, used when the worker runs in
    another process than the scheduler (vLLM's multiprocess executor): the scheduler keeps a
    mirror of the worker's CPU-tier keys for its lookups. Keys are in rank 0's namespace.
    ``events`` is ordered: ``(True, keys)`` admitted, ``(False, keys)`` evicted or deleted.

    ``unstored``: request id -> index of the first prompt chunk that is not stored after all
    (its store was dropped because its context failed to load, or its load failed): the
    scheduler stores those chunks again once vLLM has recomputed them.
    """

    events: list[tuple[bool, list[bytes]]] = field(default_factory=list)
    unstored: dict[str, int] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVCoreWorkerMeta:
        # Several ranks: admissions as the first rank reports them, evictions from every rank
        # (a chunk one rank lost is no hit; a rank missing a shard reports a load error), and
        # the earliest unstored chunk any rank reports.
        if isinstance(other, KVCoreWorkerMeta):
            removed = [(False, keys) for admitted, keys in other.events if not admitted]
            unstored = dict(self.unstored)
            for req_id, chunk in other.unstored.items():
                unstored[req_id] = min(chunk, unstored.get(req_id, chunk))
            return KVCoreWorkerMeta(self.events + removed, unstored)
        return self
