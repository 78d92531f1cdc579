"""Worker side of the connector: moves whole engine blocks between vLLM's KV cache and kvcore.

- **Load** (``start_load``): lease the chunks from kvcore (zero copy) and scatter them into the
  request's blocks in one batched copy per request, or layer by layer in a background thread
  (``KVCORE_VLLM_LAYERWISE``) so layer i+1 loads while layer i computes. A chunk that is missing,
  late or has the wrong size turns its blocks into load errors (vLLM recomputes them).
  Loads marked asynchronous run in a background thread while the batch computes; the request
  is reported received by ``get_finished`` (failed blocks no later than that).
- **Store** (``submit_stores``): hand kvcore a :class:`BlockSource`; kvcore's store thread
  reserves CPU buffers and gathers all the blocks in one call, off the critical path. A finished
  request's blocks stay allocated until its stores are done (reported by ``get_finished``); a
  preempted request's pending stores are cancelled before vLLM reuses its blocks. A store whose
  blocks or context blocks failed to load this step is dropped (its KV was computed over a
  wrong context) and reported back, so the scheduler stores it after vLLM recomputed it.
- **Verify** (``verify_only`` stores): the KV vLLM recomputed for a sampled hit is compared
  with kvcore's copy (:mod:`kvcore_vllm.verify`); a mismatching chunk is replaced.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvcore.background import lower_priority
from kvcore.engine import CacheEngine, StoreHandle
from kvcore.failures import FailureLog
from kvcore.keys import NAMESPACE_BYTES, ChunkKey, Namespace
from kvcore_vllm.copyops import KVLayout, gather, layout_for, scatter
from kvcore_vllm.metadata import KVCoreMetadata, KVCoreWorkerMeta, LoadSpec, StoreSpec
from kvcore_vllm.verify import Verifier

log = logging.getLogger("vllm.kvcore")


class BlockSource:
    """kvcore ChunkSource over vLLM blocks; :meth:`cancel` makes a not-yet-run fill fail."""

    def __init__(self, layers: Sequence[torch.Tensor], layout: KVLayout, block_ids: list[int],
                 blocks_per_chunk: int, ready: Any = None) -> None:
        self.layers, self.layout, self.block_ids = layers, layout, block_ids
        self.k = blocks_per_chunk
        self.ready = ready
        self._lock = threading.Lock()
        self._cancelled = False

    def chunk_nbytes(self) -> int:
        return len(self.layers) * self.k * self.layout.block_bytes

    def fill(self, indices: Sequence[int], dests: Sequence[np.ndarray]) -> None:
        with self._lock:
            if self._cancelled:
                raise RuntimeError("store cancelled: the request's blocks were released")
            if self.ready is not None:
                self.ready.synchronize()  # GPU: the step's KV writes are complete
            ids = [b for i in indices for b in self.block_ids[i * self.k:(i + 1) * self.k]]
            gather(self.layers, self.layout, ids, dests, self.k)

    def cancel(self) -> None:
        """Waits for a fill in progress (a memcpy), then prevents any later fill."""
        with self._lock:
            self._cancelled = True


class _LayerwiseLoad:
    """Scatters one step's leased chunks layer by layer in a thread; one event per layer."""

    def __init__(self, worker: WorkerSide, jobs: list[tuple[LoadSpec, Any, int]]) -> None:
        self.worker = worker
        self.jobs = jobs
        self.events = [threading.Event() for _ in worker.layers]
        self.failed_specs: list[LoadSpec] = []
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="kvcore-layerwise", daemon=True)
        self.thread.start()

    def fail(self, spec: LoadSpec) -> None:
        with self._lock:
            self.failed_specs.append(spec)

    def _run(self) -> None:
        try:
            for layer in range(len(self.worker.layers)):
                for spec, lease, n in self.jobs:
                    try:
                        self.worker._scatter(spec, lease.views[:n], layers=[layer])
                    except Exception as exc:
                        self.fail(spec)
                        self.worker.failures.record("layer-wise load", exc)
                self.events[layer].set()
        finally:
            for event in self.events:
                event.set()
            for _, lease, _ in self.jobs:
                lease.close()


class WorkerSide:
    """Loads and stores for one vLLM worker; see the module docstring."""

    def __init__(self, engine: CacheEngine, namespace: Namespace, block_size: int,
                 blocks_per_chunk: int, layer_names: list[str], layerwise: bool,
                 load_timeout_s: float, store_timeout_s: float,
                 verify_tolerance: float = 0.0) -> None:
        self.engine = engine
        self.namespace = namespace
        self._digests: dict[str, bytes] = {}
        self._rank0_digest: dict[bytes, bytes] = {}
        self._events: list[tuple[bool, list[bytes]]] = []
        self._events_lock = threading.Lock()
        engine.subscribe(self._on_tier_event)
        self.block_size = block_size
        self.k = blocks_per_chunk
        self.layer_names = layer_names
        self.layerwise = layerwise
        self.load_timeout_s = load_timeout_s
        self.store_timeout_s = store_timeout_s
        self.layers: list[torch.Tensor] = []
        self.layout: KVLayout | None = None
        self._layer_index: dict[str, int] = {}
        self._load_errors: set[int] = set()
        """Failed blocks not yet reported to vLLM (:meth:`take_load_errors` empties it)."""
        self._step_failed: set[int] = set()
        """Every block that failed to load in this step, reported or not: no chunk computed
        over one is stored. Reset by :meth:`begin_step` only, so it does not depend on whether
        vLLM takes the load errors before or after ``wait_for_save`` (0.33's Model Runner V2
        with a speculator takes them first)."""
        self._pending: dict[str, list[tuple[StoreHandle, BlockSource]]] = {}
        self._finished: dict[str, float] = {}
        self._layerwise: _LayerwiseLoad | None = None
        self.failures = FailureLog(log, "the blocks are recomputed", metrics=engine.metrics,
                                   counter="vllm_worker_errors_total")
        """Every failure of this side: counted, logged once per kind, never raised."""
        self._unstored: dict[str, int] = {}
        """Request -> first prompt chunk to store again (reported to the scheduler)."""
        self._async_lock = threading.Lock()
        self._async_done: list[tuple[str, list[int], int]] = []
        """Finished background loads: (request, failed block ids, first failed chunk)."""
        self._async_threads: list[threading.Thread] = []
        self.verifier = Verifier(engine, verify_tolerance)

    def fail_blocks(self, block_ids: Sequence[int]) -> None:
        """Blocks whose load failed: reported to vLLM (recompute) and zeroed, as vLLM would
        have zeroed them had the scheduler not skipped that for a load."""
        block_ids = list(block_ids)
        if not block_ids:
            return
        self._load_errors.update(block_ids)
        self._step_failed.update(block_ids)
        try:
            for layer in self.layers:
                ids = torch.as_tensor(block_ids, dtype=torch.long, device=layer.device)
                flash = layer.dim() == 5 and layer.shape[0] == 2
                layer.index_fill_(1 if flash else 0, ids, 0)
        except Exception as exc:
            self.failures.record("zeroing failed blocks", exc)

    # -- setup -----------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = [n for n in self.layer_names if n in kv_caches] or sorted(kv_caches)
        self.layers = [kv_caches[n] for n in names]
        self._layer_index = {n: i for i, n in enumerate(names)}
        layouts = {layout_for(t) for t in self.layers}
        if len(layouts) != 1:
            raise ValueError(f"kvcore: KV layers differ in layout: {layouts}")
        self.layout = layouts.pop()
        log.info("kvcore: %d KV layers of shape %s, %d bytes per block, %d blocks per chunk",
                 len(self.layers), tuple(self.layers[0].shape), self.layout.block_bytes, self.k)

    def own_keys(self, keys: list[ChunkKey], tenant: str) -> list[ChunkKey]:
        """The scheduler's keys (rank 0's namespace) in this rank's namespace, same tenant."""
        digest = self._digests.get(tenant)
        if digest is None:
            namespace = self.namespace.with_tenant(tenant)
            self.engine.note_namespace(namespace)  # its dtype, for the tiers' codecs
            digest = self._digests[tenant] = namespace.digest
        if keys:
            self._rank0_digest[digest] = keys[0][:NAMESPACE_BYTES]
        if keys and keys[0][:NAMESPACE_BYTES] == digest:
            return keys
        return [digest + key[NAMESPACE_BYTES:] for key in keys]

    def chunk_nbytes(self) -> int:
        assert self.layout is not None
        return len(self.layers) * self.k * self.layout.block_bytes

    # -- load ------------------------------------------------------------------------------------

    def _chunk_blocks(self, spec: LoadSpec, n: int) -> list[tuple[int, int, list[int]]]:
        """For the first ``n`` chunks of ``spec``: (chunk, first block, destination block ids).

        The first chunk may start at ``skip_blocks`` (vLLM computed its head) and the last may
        end early (the prompt's last block is computed)."""
        k, skip, total = self.k, spec.skip_blocks, len(spec.block_ids)
        out = []
        for j in range(n):
            lo = max(skip, j * k) - j * k
            hi = min(skip + total, (j + 1) * k) - j * k
            if hi > lo:
                start = j * k + lo - skip
                out.append((j, lo, spec.block_ids[start:start + hi - lo]))
        return out

    def _scatter(self, spec: LoadSpec, views: Sequence[Any],
                 layers: list[int] | None = None) -> None:
        """Copy leased chunk ``views`` into the spec's blocks (of ``layers``, default all)."""
        assert self.layout is not None
        k, bb = self.k, self.layout.block_bytes
        indices = layers if layers is not None else list(range(len(self.layers)))
        placed = self._chunk_blocks(spec, len(views))
        whole = [(j, ids) for j, _, ids in placed if len(ids) == k]
        parts = [(j, lo, ids) for j, lo, ids in placed if len(ids) < k]
        if whole:
            ids = [b for _, chunk_ids in whole for b in chunk_ids]
            if layers is None:
                scatter([views[j] for j, _ in whole], self.layers, self.layout, ids, k)
            else:
                for layer in indices:
                    srcs = [views[j][layer * k * bb:(layer + 1) * k * bb] for j, _ in whole]
                    scatter(srcs, [self.layers[layer]], self.layout, ids, k)
        for j, lo, ids in parts:  # a chunk loaded in part: its blocks, layer by layer
            for layer in indices:
                src = views[j][(layer * k + lo) * bb:(layer * k + lo + len(ids)) * bb]
                scatter([src], [self.layers[layer]], self.layout, ids, len(ids))

    def _failed_blocks(self, spec: LoadSpec, loaded_chunks: int) -> list[int]:
        """Block ids of the spec from chunk ``loaded_chunks`` on."""
        done = sum(len(ids) for _, _, ids in self._chunk_blocks(spec, loaded_chunks))
        return list(spec.block_ids[done:])

    def start_load(self, meta: KVCoreMetadata) -> None:
        jobs = []
        background = [spec for spec in meta.loads if spec.is_async]
        for spec in meta.loads:
            if spec.is_async:
                continue
            lease, n, failed, first_failed = self._lease(spec)
            if failed:
                self.fail_blocks(failed)
                self._note_unstored(spec.req_id, first_failed)
            if lease is None:
                continue
            if self.layerwise:
                jobs.append((spec, lease, n))
                continue
            try:
                self._scatter(spec, lease.views[:n])
            except Exception as exc:
                self.fail_blocks(spec.block_ids)
                self._note_unstored(spec.req_id, spec.first_chunk)
                self.failures.record("scatter", exc)
            finally:
                lease.close()
        if jobs:
            self._layerwise = _LayerwiseLoad(self, jobs)
        if background:
            thread = threading.Thread(target=self._load_in_background, args=(background,),
                                      name="kvcore-async-load", daemon=True)
            self._async_threads.append(thread)
            thread.start()

    def _lease(self, spec: LoadSpec) -> tuple[Any, int, list[int], int]:
        """Hold the spec's chunks. Returns the lease (None when nothing loads), how many of its
        chunks to copy, the blocks that cannot load (missing, late or of a foreign size) and
        the first prompt chunk that did not load."""
        if not spec.keys:  # the scheduler could not plan this promised load
            return None, 0, list(spec.block_ids), spec.first_chunk
        try:
            keys = self.own_keys(spec.keys, spec.tenant)
            lease = self.engine.acquire(keys, timeout_s=self.load_timeout_s,
                                        request_id=spec.req_id, first_chunk=spec.first_chunk)
        except Exception as exc:
            self.failures.record("acquiring chunks", exc)
            return None, 0, list(spec.block_ids), spec.first_chunk
        nbytes = self.chunk_nbytes()  # a chunk of another size is foreign: never copy it
        n = next((i for i, v in enumerate(lease.views) if v.nbytes != nbytes), len(lease))
        failed: list[int] = []
        if n < len(spec.keys):
            failed = self._failed_blocks(spec, n)
            self.engine.metrics.inc("vllm_load_error_blocks_total", len(failed))
            self.failures.record("loading chunks", RuntimeError(
                f"{len(spec.keys) - n} of {len(spec.keys)} promised chunks unavailable"))
        if n == 0:
            lease.close()
            return None, 0, failed, spec.first_chunk
        loaded = sum(len(ids) for _, _, ids in self._chunk_blocks(spec, n)) * self.block_size
        self.engine.metrics.inc("vllm_loaded_tokens_total", loaded)
        return lease, n, failed, spec.first_chunk + n

    def _load_in_background(self, specs: list[LoadSpec]) -> None:
        """Asynchronous loads: lease and scatter; ``get_finished`` then reports each request
        received, with its failed blocks (vLLM re-zeroes and recomputes those). Runs at the
        background priority: the batch that computes meanwhile comes first."""
        lower_priority(self.engine.settings.background_nice)
        for spec in specs:
            failed: list[int] = []
            first_failed = 0
            lease = None
            try:
                lease, n, failed, first_failed = self._lease(spec)
                if lease is not None:
                    self._scatter(spec, lease.views[:n])
            except Exception as exc:
                failed, first_failed = list(spec.block_ids), spec.first_chunk
                self.failures.record("asynchronous load", exc)
            finally:
                if lease is not None:
                    lease.close()
            self.engine.metrics.inc("vllm_async_loads_total")
            with self._async_lock:
                self._async_done.append((spec.req_id, failed, first_failed))

    def wait_for_layer(self, layer_name: str) -> None:
        load = self._layerwise
        if load is None:
            return
        index = self._layer_index.get(layer_name)
        if index is not None and not load.events[index].wait(self.load_timeout_s):
            for spec, _, _ in load.jobs:
                load.fail(spec)
            self.failures.record("layer-wise load", TimeoutError(f"layer {layer_name} late"))

    def finish_layerwise(self) -> None:
        """Join the layer-wise loader (it only copies memory, so this ends)."""
        load, self._layerwise = self._layerwise, None
        if load is not None:
            load.thread.join()
            self.fail_blocks(sorted({b for spec in load.failed_specs for b in spec.block_ids}))
            for spec in load.failed_specs:
                self._note_unstored(spec.req_id, spec.first_chunk)

    def begin_step(self) -> None:
        """A new step's metadata is bound: its failures start afresh."""
        self._step_failed = set()

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def _note_unstored(self, req_id: str, chunk: int) -> None:
        """Tell the scheduler that the request's chunks from ``chunk`` on are not stored."""
        self._unstored[req_id] = min(chunk, self._unstored.get(req_id, chunk))

    # -- what the scheduler in another process needs to know ----------------------------------

    def _on_tier_event(self, tier: str, kind: str, keys: list[ChunkKey]) -> None:
        if tier != self.engine.memory.name:
            return
        mapped = []
        for key in keys:
            rank0 = self._rank0_digest.get(key[:NAMESPACE_BYTES])
            if rank0 is not None:
                mapped.append(rank0 + key[NAMESPACE_BYTES:])
        if mapped:
            with self._events_lock:
                self._events.append((kind == "admit", mapped))

    def take_worker_meta(self) -> KVCoreWorkerMeta | None:
        with self._events_lock:
            events, self._events = self._events, []
        unstored, self._unstored = self._unstored, {}
        return KVCoreWorkerMeta(events, unstored) if events or unstored else None

    # -- store -----------------------------------------------------------------------------------

    def submit_stores(self, meta: KVCoreMetadata) -> None:
        """Store (or verify) the chunks this step completed, unless their KV was computed over
        a block that failed to load in this step."""
        if not meta.stores:
            return
        assert self.layout is not None
        ready = None
        if self.layers and self.layers[0].is_cuda:
            ready = torch.cuda.Event()
            ready.record()
        failed = self._step_failed
        for spec in meta.stores:
            pending = self._pending.setdefault(spec.req_id, [])
            if failed and self._computed_over_failed_blocks(spec, failed):
                self._note_unstored(spec.req_id, spec.first_chunk)
                self.engine.metrics.inc("vllm_stores_dropped_total", len(spec.keys))
                continue
            source = BlockSource(self.layers, self.layout, spec.block_ids, self.k, ready)
            keys = self.own_keys(spec.keys, spec.tenant)
            if spec.verify_only:
                try:
                    self.verifier.submit(keys, source, self.layers[0].dtype, spec.first_chunk)
                except Exception as exc:
                    self.failures.record("verification", exc)
                continue
            try:
                handle = self.engine.store(keys, source)
            except Exception as exc:
                self.failures.record("store", exc)
                continue
            pending.append((handle, source))
            self.engine.metrics.inc("vllm_store_requests_total")

    @staticmethod
    def _computed_over_failed_blocks(spec: StoreSpec, failed: set[int]) -> bool:
        return any(b in failed for b in spec.context_block_ids) or any(
            b in failed for b in spec.block_ids)

    def cancel_stores(self, req_ids: set[str]) -> None:
        """Preempted requests: their blocks are about to be reused."""
        for req_id in req_ids:
            if req_id not in self._pending:
                continue
            for handle, source in self._pending[req_id]:
                if not handle.done():
                    source.cancel()
                    self.engine.metrics.inc("vllm_store_cancelled_total")
            self._pending[req_id] = []  # still reported as finished when the request ends

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        """Finished requests whose stores are done (their blocks can be freed now), and
        requests whose asynchronous loads completed (their failed blocks are reported by the
        next :meth:`take_load_errors`, in the same step)."""
        return self._finished_sending(finished_req_ids), self._finished_receiving()

    def _finished_receiving(self) -> set[str]:
        with self._async_lock:
            done, self._async_done = self._async_done, []
        self._async_threads = [t for t in self._async_threads if t.is_alive()]
        received = set()
        for req_id, failed, first_failed in done:
            if failed:
                self._load_errors.update(failed)  # vLLM re-zeroes and recomputes them
                self._step_failed.update(failed)
                self._note_unstored(req_id, first_failed)
            received.add(req_id)
        return received

    def _finished_sending(self, finished_req_ids: set[str]) -> set[str]:
        now = time.monotonic()
        for req_id in finished_req_ids:
            if req_id in self._pending:
                self._finished.setdefault(req_id, now)
        done: set[str] = set()
        for req_id, since in list(self._finished.items()):
            pending = self._pending.get(req_id, [])
            if all(h.done() for h, _ in pending):
                done.add(req_id)
            elif now - since > self.store_timeout_s:
                for _, source in pending:
                    source.cancel()
                self.engine.metrics.inc("vllm_store_timeouts_total")
                self.failures.record("store", TimeoutError(
                    f"not done after {self.store_timeout_s}s; blocks released"))
                done.add(req_id)
        for req_id in done:
            self._finished.pop(req_id, None)
            self._pending.pop(req_id, None)
        return done

    def wait_for_async_loads(self, timeout: float = 10.0) -> None:
        """Wait for the background loads started so far (tests, benchmarks)."""
        for thread in list(self._async_threads):
            thread.join(timeout)

    def close(self) -> None:
        self.finish_layerwise()
        for thread in self._async_threads:
            thread.join(timeout=self.load_timeout_s)
        self.verifier.close()
