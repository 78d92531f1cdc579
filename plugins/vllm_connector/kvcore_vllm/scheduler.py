"""Scheduler side of the connector: lookup, load planning, store planning.

Runs in vLLM's scheduler (EngineCore). Per request it keeps the prompt's chunk keys (under the
request's tenant), how many leading chunks kvcore holds, the load vLLM agreed to, and how many
chunks were already handed to the worker for storing. Every step it turns that into a
:class:`~kvcore_vllm.metadata.KVCoreMetadata`. Nothing here raises into vLLM: a failing lookup
is a miss.

Correctness rules kept here (see docs/vllm.md, "A hit never changes the output"):

- loads are block-granular: a prompt of whole chunks loads all but its last block;
- a chunk is stored only from KV computed over a fully loaded context: when the worker reports
  a store dropped or a load failed (``KVCoreWorkerMeta.unstored``), the request's stored-chunk
  count is rewound and the chunks are stored again once vLLM has recomputed them;
- a preempted request stores its chunks again after it resumes;
- chunks that are not in the worker's memory tier are loaded asynchronously (the request waits
  in WAITING_FOR_REMOTE_KVS while the batch runs);
- a sampled fraction of would-be hits (``KVCORE_VERIFY_SAMPLE``) is recomputed and compared
  with the stored chunks instead of loaded.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

from kvcore.engine import CacheEngine
from kvcore.events.publisher import KVEventPublisher
from kvcore.failures import FailureLog
from kvcore.keys import ChunkKey, Namespace
from kvcore_vllm.events import chunk_labels
from kvcore_vllm.metadata import KVCoreMetadata, LoadSpec, StoreSpec

log = logging.getLogger("vllm.kvcore")

LOAD_RETRIES = 3
"""Failed loads of one request after which kvcore stops claiming the chunk that failed."""


@dataclass
class _Tracked:
    """What the scheduler side knows about one request."""

    request: Any
    keys: list[ChunkKey]
    hit_tokens: int = 0
    """Leading tokens kvcore can provide at the last lookup (block-aligned, one token left)."""
    hit_async: bool = False
    """The last lookup found chunks outside the worker's memory tier: load them in the
    background."""
    load_range: tuple[int, int] | None = None
    """Tokens [start, end) vLLM agreed to load, not yet sent to the worker."""
    stored_chunks: int = 0
    """Leading chunks already in kvcore or handed to the worker for storing."""
    stores_issued: bool = False
    tenant: str = ""
    verify_chunks: int = 0
    """Leading chunks kvcore held when this request was sampled for verification: vLLM
    recomputes them and the worker compares (0: not sampled)."""
    sampled: bool = False
    """The verification draw was made (once per request)."""
    load_failures: int = 0
    """Loads of this request that failed part-way."""
    load_cap: int | None = None
    """After ``LOAD_RETRIES`` failed loads: claim at most this many leading chunks again. A
    failed asynchronous load sends the request back to vLLM's waiting queue, whose next lookup
    may retry (a peer still storing the chunk); the cap keeps that from looping for ever."""


class SchedulerSide:
    """Lookup and step planning; see the module docstring."""

    def __init__(self, engine: CacheEngine, namespace: Namespace, block_size: int,
                 blocks_per_chunk: int, worker_in_process: bool = True,
                 async_loads: bool = True, verify_sample: float = 0.0,
                 rng: random.Random | None = None) -> None:
        self.engine = engine
        self.worker_in_process = worker_in_process
        self.namespace = namespace
        self.block_size = block_size
        self.blocks_per_chunk = blocks_per_chunk
        self.chunk_size = engine.chunk_size
        self.async_loads = async_loads
        self.verify_sample = verify_sample
        self._rng = rng or random.Random()
        self.kv_cache_manager: Any = None
        self.worker_chunks: set[ChunkKey] = set()
        """Mirror of the worker's CPU-tier keys when it runs in another process."""
        self._requests: dict[str, _Tracked] = {}
        self.failures = FailureLog(log, "treated as a miss", metrics=engine.metrics,
                                   counter="vllm_scheduler_errors_total")
        """Every failure of this side: counted, logged once per kind, never raised."""

    @property
    def sees_worker_tier(self) -> bool:
        """This process's engine sees the worker's memory tier: the worker shares the process,
        or both use the cache server's shared tier (docs/server.md)."""
        return self.worker_in_process or self.engine.memory.shared

    # -- helpers ---------------------------------------------------------------------------------

    def _track(self, request: Any) -> _Tracked:
        tracked = self._requests.get(request.request_id)
        if tracked is None:
            tenant = getattr(request, "cache_salt", None) or ""
            keys = self.engine.keys_for(self.namespace.with_tenant(tenant),
                                        request.prompt_token_ids or [])
            tracked = _Tracked(request, keys, tenant=tenant)
            self._requests[request.request_id] = tracked
            self._label(request, keys)
        return tracked

    def _label(self, request: Any, keys: list[ChunkKey]) -> None:
        """Tell kvcore's KV event publisher (when it runs in this process) vLLM's block hashes
        of the request's chunks, announced when they are stored or promoted."""
        publisher = self.engine.attachments.get("kv_events") if self.worker_in_process else None
        if isinstance(publisher, KVEventPublisher) and keys:
            pool = getattr(self.kv_cache_manager, "block_pool", None)
            labels = chunk_labels(request, len(keys), self.block_size, self.blocks_per_chunk,
                                  getattr(pool, "hash_block_size", None))
            publisher.label(keys[:len(labels)], labels)

    def _block_ids(self, req_id: str) -> list[int]:
        return list(self.kv_cache_manager.get_block_ids(req_id)[0])

    # -- vLLM scheduler-side API -----------------------------------------------------------------

    def on_new_request(self, request: Any) -> None:
        try:
            self._track(request)
        except Exception as exc:
            self.failures.record("hashing a prompt", exc)

    def get_num_new_matched_tokens(self, request: Any,
                                   num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens beyond ``num_computed_tokens`` (vLLM's own hit) that kvcore can load, and
        whether they load asynchronously."""
        try:
            tracked = self._track(request)
            tracked.load_range = None
            tracked.hit_tokens, tracked.hit_async = 0, False
            # vLLM computes at least one token itself: load whole blocks up to the block that
            # holds the last prompt token, like vLLM's own prefix cache.
            limit = (max(0, request.num_tokens - 1) // self.block_size) * self.block_size
            usable = min(len(tracked.keys), -(-limit // self.chunk_size))
            if tracked.load_cap is not None:
                usable = min(usable, tracked.load_cap)
            if usable == 0:
                self._record_short(tracked)
                return 0, False
            chunks, in_memory = self._lookup(tracked.keys[:usable], tracked)
            if chunks and self._sample_for_verification(tracked, chunks):
                return 0, False
            tracked.stored_chunks = max(tracked.stored_chunks, chunks)
            hit = min(chunks * self.chunk_size, limit)
            if hit <= num_computed_tokens:
                return 0, False
            tracked.hit_tokens = hit
            # Asynchronous when some of the tokens to load are outside the worker's memory.
            tracked.hit_async = self.async_loads and hit > in_memory * self.chunk_size
            return hit - num_computed_tokens, tracked.hit_async
        except Exception as exc:
            self.failures.record("lookup", exc)
            return 0, False

    def _sample_for_verification(self, tracked: _Tracked, chunks: int) -> bool:
        """Draw once per request; a sampled request recomputes ``chunks`` for verification."""
        if tracked.sampled:
            return tracked.verify_chunks > 0
        tracked.sampled = True
        if self.verify_sample <= 0 or self._rng.random() >= self.verify_sample:
            return False
        tracked.verify_chunks = chunks
        self.engine.metrics.inc("verify_sampled_total")
        return True

    def _record_short(self, tracked: _Tracked) -> None:
        """Record a request with nothing to look up (shorter than a chunk), for /v1/requests."""
        if self.sees_worker_tier:
            self.engine.lookup([], request_id=tracked.request.request_id,
                               tokens=tracked.request.prompt_token_ids or [])

    def _lookup(self, keys: list[ChunkKey], tracked: _Tracked) -> tuple[int, int]:
        """Leading chunks available, and how many of those are in the worker's memory tier:
        in this process's engine (the worker shares it, or both attach to the cache server),
        or (worker elsewhere, its CPU tier private) in the mirror of the worker's CPU tier
        followed by this engine's shared lower tiers. Through the engine, the lookup is
        recorded with the reason for the first chunk missing (docs/misses.md)."""
        if self.sees_worker_tier:
            found = self.engine.lookup(keys, request_id=tracked.request.request_id,
                                       tokens=tracked.request.prompt_token_ids)
            cpu = self.engine.memory.name
            in_memory = 0
            while in_memory < found.chunks and found.sources[in_memory] == cpu:
                in_memory += 1
            return found.chunks, in_memory
        n = 0
        while n < len(keys) and keys[n] in self.worker_chunks:
            n += 1
        in_memory = n
        if n < len(keys) and self.engine.lower:
            n += self.engine.lookup(keys[n:], prefetch=False).chunks
        return n, in_memory

    def apply_worker_meta(self, meta: Any) -> None:
        for admitted, keys in getattr(meta, "events", ()):
            if admitted:
                self.worker_chunks.update(keys)
            else:
                self.worker_chunks.difference_update(keys)
        for req_id, chunk in getattr(meta, "unstored", {}).items():
            tracked = self._requests.get(req_id)
            if tracked is None:
                continue
            if chunk < tracked.stored_chunks:
                tracked.stored_chunks = chunk
                self.engine.metrics.inc("vllm_stores_rewound_total")
            if tracked.hit_tokens and chunk * self.chunk_size < tracked.hit_tokens:
                # a load of this request failed from ``chunk`` on
                tracked.load_failures += 1
                if tracked.load_failures >= LOAD_RETRIES:
                    tracked.load_cap = min(chunk, tracked.load_cap if tracked.load_cap
                                           is not None else chunk)

    def update_state_after_alloc(self, request: Any, num_external_tokens: int) -> None:
        tracked = self._requests.get(request.request_id)
        if tracked is None or num_external_tokens <= 0:
            return
        end = tracked.hit_tokens
        tracked.load_range = (end - num_external_tokens, end)

    def build_meta(self, scheduler_output: Any) -> KVCoreMetadata:
        """Loads agreed this step, stores of newly completed chunks, preempted requests."""
        meta = KVCoreMetadata(preempted=set(scheduler_output.preempted_req_ids or ()))
        for req_id in meta.preempted:
            self.engine.metrics.inc("vllm_preempted_requests_total")
            tracked = self._requests.get(req_id)
            if tracked is not None:
                # The worker cancels the request's pending stores: redo them after it resumes
                # (the engine skips chunks that did land).
                tracked.load_range = None
                tracked.stored_chunks = 0
        for req_id, tracked in self._requests.items():
            if tracked.load_range is None:
                continue
            promised, tracked.load_range = tracked.load_range, None
            try:
                meta.loads.append(self._load_spec(tracked, req_id, promised))
            except Exception as exc:
                self.failures.record("planning a load", exc)
                self._fail_promise(meta, req_id, promised, tracked.hit_async)
        for req_id, scheduled in scheduler_output.num_scheduled_tokens.items():
            tracked = self._requests.get(req_id)
            if tracked is None:
                continue
            meta.step.append((int(tracked.request.num_computed_tokens), int(scheduled)))
            try:
                self._plan_stores(meta, tracked, req_id, scheduled)
            except Exception as exc:
                self.failures.record("planning a store", exc)
        self._skip_zeroing(scheduler_output, meta)
        return meta

    def _fail_promise(self, meta: KVCoreMetadata, req_id: str, promised: tuple[int, int],
                      is_async: bool) -> None:
        """vLLM counts the promised tokens as computed: have the worker report them failed."""
        try:
            block_ids = self._block_ids(req_id)
            first = promised[0] // self.block_size
            last = -(-promised[1] // self.block_size)
            meta.loads.append(LoadSpec(req_id, [], block_ids[first:last], is_async=is_async))
        except Exception as exc:
            log.error("kvcore: cannot report a failed load of request %s (%s)", req_id, exc)

    @staticmethod
    def _skip_zeroing(scheduler_output: Any, meta: KVCoreMetadata) -> None:
        """Blocks this step loads synchronously are overwritten whole: vLLM need not zero them
        first (the one change to the scheduler output a synchronous loading connector may
        make). The worker zeroes the blocks of a load that fails instead."""
        to_zero = getattr(scheduler_output, "new_block_ids_to_zero", None)
        if not to_zero or not meta.loads:
            return
        loaded = {b for spec in meta.loads if not spec.is_async for b in spec.block_ids}
        scheduler_output.new_block_ids_to_zero = [b for b in to_zero if b not in loaded] or None

    def _load_spec(self, tracked: _Tracked, req_id: str, promised: tuple[int, int]) -> LoadSpec:
        """The blocks of tokens ``promised`` and the chunks that hold them."""
        start, end = promised
        bs, chunk = self.block_size, self.chunk_size
        block_ids = self._block_ids(req_id)
        first, last = start // chunk, -(-end // chunk)
        skip = (start - first * chunk) // bs
        blocks = block_ids[start // bs:end // bs]
        if len(blocks) != (end - start) // bs:
            raise RuntimeError(f"request {req_id} has {len(block_ids)} blocks, "
                               f"needs {end // bs}")
        return LoadSpec(req_id, tracked.keys[first:last], blocks, skip, tracked.tenant,
                        is_async=tracked.hit_async, first_chunk=first)

    def _plan_stores(self, meta: KVCoreMetadata, tracked: _Tracked, req_id: str,
                     scheduled: int) -> None:
        """After this step vLLM holds KV for num_computed_tokens + scheduled tokens: store the
        prompt chunks that became complete (whole chunks, prompt tokens only). Chunks sampled
        for verification are compared instead of stored."""
        k, chunk = self.blocks_per_chunk, self.chunk_size
        computed = tracked.request.num_computed_tokens + scheduled
        full = min(len(tracked.keys), computed // chunk)
        if full <= tracked.stored_chunks:
            return
        block_ids = self._block_ids(req_id)
        if len(block_ids) < full * k:
            return
        first = tracked.stored_chunks
        split = min(max(first, tracked.verify_chunks), full)
        for lo, hi, verify in ((first, split, True), (split, full, False)):
            if hi > lo:
                meta.stores.append(StoreSpec(
                    req_id, tracked.keys[lo:hi], block_ids[lo * k:hi * k], tracked.tenant,
                    context_block_ids=block_ids[:lo * k], first_chunk=lo, verify_only=verify))
        tracked.stored_chunks = full
        tracked.stores_issued = True

    def request_finished(self, request: Any) -> bool:
        """True when the worker may still be copying this request's blocks (free them later)."""
        tracked = self._requests.pop(request.request_id, None)
        return tracked is not None and tracked.stores_issued

    def forget(self, req_id: str) -> None:
        self._requests.pop(req_id, None)
