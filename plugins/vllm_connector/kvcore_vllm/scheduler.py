"""Scheduler side of the connector: lookup, load planning, store planning.

Runs in vLLM's scheduler (EngineCore). Per request it keeps the prompt's chunk keys (under the
request's tenant), how many leading chunks kvcore holds, the load vLLM agreed to, and how many
chunks were already handed to the worker for storing. Every step it turns that into a
:class:`~kvcore_vllm.metadata.KVCoreMetadata`. Nothing here raises into vLLM: a failing lookup
is a miss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from kvcore.engine import CacheEngine
from kvcore.keys import ChunkKey, Namespace
from kvcore_vllm.metadata import KVCoreMetadata, LoadSpec, StoreSpec

log = logging.getLogger("vllm.kvcore")


@dataclass
class _Tracked:
    """What the scheduler side knows about one request."""

    request: Any
    keys: list[ChunkKey]
    hit_chunks: int = 0
    """Leading chunks kvcore held at the last lookup (capped so one token is left to compute)."""
    load_range: tuple[int, int] | None = None
    """Tokens [start, end) vLLM agreed to load, not yet sent to the worker."""
    stored_chunks: int = 0
    """Leading chunks already in kvcore or handed to the worker for storing."""
    stores_issued: bool = False
    tenant: str = ""


class SchedulerSide:
    """Lookup and step planning; see the module docstring."""

    def __init__(self, engine: CacheEngine, namespace: Namespace, block_size: int,
                 blocks_per_chunk: int, worker_in_process: bool = True) -> None:
        self.engine = engine
        self.worker_in_process = worker_in_process
        self.namespace = namespace
        self.block_size = block_size
        self.blocks_per_chunk = blocks_per_chunk
        self.chunk_size = engine.chunk_size
        self.kv_cache_manager: Any = None
        self.worker_chunks: set[ChunkKey] = set()
        """Mirror of the worker's CPU-tier keys when it runs in another process."""
        self._requests: dict[str, _Tracked] = {}
        self._logged: set[str] = set()

    # -- helpers ---------------------------------------------------------------------------------

    def _warn_once(self, what: str, exc: BaseException) -> None:
        self.engine.metrics.inc("vllm_scheduler_errors_total", label=what)
        if what not in self._logged:
            self._logged.add(what)
            log.warning("kvcore: %s failed (%s: %s); treated as a miss", what,
                        type(exc).__name__, exc)

    def _track(self, request: Any) -> _Tracked:
        tracked = self._requests.get(request.request_id)
        if tracked is None:
            tenant = getattr(request, "cache_salt", None) or ""
            keys = self.engine.keys_for(self.namespace.with_tenant(tenant),
                                        request.prompt_token_ids or [])
            tracked = _Tracked(request, keys, tenant=tenant)
            self._requests[request.request_id] = tracked
        return tracked

    def _block_ids(self, req_id: str) -> list[int]:
        return list(self.kv_cache_manager.get_block_ids(req_id)[0])

    # -- vLLM scheduler-side API -----------------------------------------------------------------

    def on_new_request(self, request: Any) -> None:
        try:
            self._track(request)
        except Exception as exc:
            self._warn_once("hashing a prompt", exc)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> int:
        """Tokens beyond ``num_computed_tokens`` (vLLM's own hit) that kvcore can load."""
        try:
            tracked = self._track(request)
            tracked.load_range = None
            # vLLM must compute at least one token of the request itself.
            usable = min(len(tracked.keys), max(0, request.num_tokens - 1) // self.chunk_size)
            if usable == 0:
                tracked.hit_chunks = 0
                return 0
            chunks = self._lookup(tracked.keys[:usable])
            tracked.hit_chunks = chunks
            tracked.stored_chunks = max(tracked.stored_chunks, chunks)
            hit_tokens = chunks * self.chunk_size
            return max(0, hit_tokens - num_computed_tokens)
        except Exception as exc:
            self._warn_once("lookup", exc)
            return 0

    def _lookup(self, keys: list[ChunkKey]) -> int:
        """Leading chunks available: in this process's engine, or (worker elsewhere) in the
        mirror of the worker's CPU tier followed by this engine's shared lower tiers."""
        if self.worker_in_process:  # the worker shares this process and its engine
            return self.engine.lookup(keys).chunks
        n = 0
        while n < len(keys) and keys[n] in self.worker_chunks:
            n += 1
        if n < len(keys) and self.engine.lower:
            n += self.engine.lookup(keys[n:], prefetch=False).chunks
        return n

    def apply_worker_meta(self, meta: Any) -> None:
        for admitted, keys in getattr(meta, "events", ()):
            if admitted:
                self.worker_chunks.update(keys)
            else:
                self.worker_chunks.difference_update(keys)

    def update_state_after_alloc(self, request: Any, num_external_tokens: int) -> None:
        tracked = self._requests.get(request.request_id)
        if tracked is None or num_external_tokens <= 0:
            return
        end = tracked.hit_chunks * self.chunk_size
        tracked.load_range = (end - num_external_tokens, end)

    def build_meta(self, scheduler_output: Any) -> KVCoreMetadata:
        """Loads agreed this step, stores of newly completed chunks, preempted requests."""
        meta = KVCoreMetadata(preempted=set(scheduler_output.preempted_req_ids or ()))
        for req_id in meta.preempted:
            tracked = self._requests.get(req_id)
            if tracked is not None:
                tracked.load_range = None
        for req_id, scheduled in scheduler_output.num_scheduled_tokens.items():
            tracked = self._requests.get(req_id)
            if tracked is None:
                continue
            promised = tracked.load_range
            loads = len(meta.loads)
            try:
                self._plan(meta, tracked, req_id, scheduled)
            except Exception as exc:
                tracked.load_range = None
                self._warn_once("planning a step", exc)
                if promised is not None and len(meta.loads) == loads:
                    self._fail_promise(meta, req_id, promised)
        self._skip_zeroing(scheduler_output, meta)
        return meta

    def _fail_promise(self, meta: KVCoreMetadata, req_id: str, promised: tuple[int, int]) -> None:
        """vLLM counts the promised tokens as computed: have the worker report them failed."""
        try:
            block_ids = self._block_ids(req_id)
            first, last = promised[0] // self.block_size, promised[1] // self.block_size
            meta.loads.append(LoadSpec(req_id, [], block_ids[first:last]))
        except Exception as exc:
            log.error("kvcore: cannot report a failed load of request %s (%s)", req_id, exc)

    @staticmethod
    def _skip_zeroing(scheduler_output: Any, meta: KVCoreMetadata) -> None:
        """Blocks this step loads are overwritten whole: vLLM need not zero them first (the
        one change to the scheduler output a synchronous loading connector may make). The
        worker zeroes the blocks of a load that fails instead."""
        to_zero = getattr(scheduler_output, "new_block_ids_to_zero", None)
        if not to_zero or not meta.loads:
            return
        loaded = {b for spec in meta.loads for b in spec.block_ids}
        scheduler_output.new_block_ids_to_zero = [b for b in to_zero if b not in loaded] or None

    def _plan(self, meta: KVCoreMetadata, tracked: _Tracked, req_id: str, scheduled: int) -> None:
        k, chunk = self.blocks_per_chunk, self.chunk_size
        block_ids: list[int] | None = None
        if tracked.load_range is not None:
            start, end = tracked.load_range
            tracked.load_range = None
            block_ids = self._block_ids(req_id)
            first = start // chunk
            skip = (start - first * chunk) // self.block_size
            blocks = block_ids[first * k + skip:(end // chunk) * k]
            meta.loads.append(LoadSpec(req_id, tracked.keys[first:end // chunk], blocks, skip,
                                        tracked.tenant))
        # After this step vLLM holds KV for num_computed_tokens + scheduled tokens: store the
        # prompt chunks that became complete (only whole chunks, only prompt tokens).
        computed = tracked.request.num_computed_tokens + scheduled
        full = min(len(tracked.keys), computed // chunk)
        if full > tracked.stored_chunks:
            block_ids = block_ids if block_ids is not None else self._block_ids(req_id)
            if len(block_ids) >= full * k:
                first = tracked.stored_chunks
                meta.stores.append(StoreSpec(req_id, tracked.keys[first:full],
                                             block_ids[first * k:full * k], tracked.tenant))
                tracked.stored_chunks = full
                tracked.stores_issued = True

    def request_finished(self, request: Any) -> bool:
        """True when the worker may still be copying this request's blocks (free them later)."""
        tracked = self._requests.pop(request.request_id, None)
        return tracked is not None and tracked.stores_issued

    def forget(self, req_id: str) -> None:
        self._requests.pop(req_id, None)
