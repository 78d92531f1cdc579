"""``KVCoreConnector``: the vLLM v1 KV connector (role ``kv_both``) backed by kvcore.

vLLM creates one instance per role: the SCHEDULER instance delegates to
:class:`~kvcore_vllm.scheduler.SchedulerSide`, the WORKER instance to
:class:`~kvcore_vllm.worker.WorkerSide`. Both use the process-wide CacheEngine of
:mod:`kvcore_vllm.runtime` (one engine when they share a process, as with one CPU worker).

Every method that vLLM calls while serving catches kvcore's failures: an exception here would
kill the engine, so a failure becomes a miss (lookup), a recompute (load) or a dropped store.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

try:  # vLLM >= 0.32 counts cached prompt tokens by source (its prompt_tokens_cached_by_source)
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
except ImportError:  # vLLM 0.31
    CacheHitSource = None  # type: ignore[assignment,misc]

from kvcore.config import ConfigError, Settings, load_settings
from kvcore.failures import FailureLog, guarded
from kvcore_vllm.metadata import KVCoreMetadata
from kvcore_vllm.namespace import (
    check_chunk_size,
    engine_namespace,
    kv_geometry,
    served_names,
)
from kvcore_vllm.prometheus import KVCorePromMetrics, KVCoreStats, StatsDelta
from kvcore_vllm.runtime import acquire_engine, counters, release_engine
from kvcore_vllm.scheduler import SchedulerSide
from kvcore_vllm.settings import VllmSettings
from kvcore_vllm.version import check_vllm_version
from kvcore_vllm.worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics,
        KVConnectorStats,
        PromMetric,
        PromMetricT,
    )
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("vllm.kvcore")

_EXTRA_PREFIX = "kvcore."


def _settings_from(extra: dict[str, Any]) -> tuple[Settings, VllmSettings]:
    """Core and plugin settings: ``kvcore.*`` keys of kv_connector_extra_config over the env."""
    given = {k[len(_EXTRA_PREFIX):]: v for k, v in extra.items() if k.startswith(_EXTRA_PREFIX)}
    core = {k: v for k, v in given.items() if k in Settings.model_fields}
    plugin = {k.removeprefix("vllm_"): v for k, v in given.items()
              if k.removeprefix("vllm_") in VllmSettings.model_fields}
    return load_settings(Settings, **core), load_settings(VllmSettings, **plugin)


def _worker_rank(vllm_config: VllmConfig) -> int:
    """This worker's rank among tensor x pipeline parallel ranks (0 when not distributed)."""
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

        tp = int(vllm_config.parallel_config.tensor_parallel_size)
        return int(get_tensor_model_parallel_rank()) + tp * int(get_pp_group().rank_in_group)
    except Exception:
        return 0


def _workers_in_scheduler_process(vllm_config: VllmConfig) -> bool:
    """One worker run by the uniprocess executor lives in the scheduler's process."""
    parallel = vllm_config.parallel_config
    backend = parallel.distributed_executor_backend
    return parallel.world_size == 1 and (backend in (None, "uni") or not isinstance(backend, str))


class KVCoreConnector(KVConnectorBase_V1):
    """kvcore as a vLLM KV connector: see the module docstring and docs/vllm.md."""

    if CacheHitSource is not None:
        _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        check_vllm_version()
        transfer = vllm_config.kv_transfer_config
        assert transfer is not None  # vLLM builds a connector only from a transfer config
        settings, self.plugin_settings = _settings_from(dict(transfer.kv_connector_extra_config))
        layer_names, spec = kv_geometry(kv_cache_config)
        block_size = int(spec.block_size)
        blocks_per_chunk = check_chunk_size(settings.chunk_size, block_size)
        scheduler_only = (role == KVConnectorRole.SCHEDULER
                          and not _workers_in_scheduler_process(vllm_config))
        self._step_started: float | None = None
        """When this step's metadata was bound (its forward follows): the planner's clock."""
        self._step_loading_s = 0.0
        self.engine = acquire_engine(settings, attachments=not scheduler_only)
        self.scheduler: SchedulerSide | None = None
        self.worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            if self.plugin_settings.load_failure_policy == "recompute":
                # kvcore is a cache: a chunk that fails to load is recomputed, never an error.
                _require_recompute_policy(transfer)
            # With TP/PP > 1 the workers run in other processes: look up rank 0's chunks (in
            # shared lower tiers only; no prefetch into this process's memory); a rank that
            # lacks its shard reports load errors and vLLM recomputes (docs/vllm.md).
            shared = not scheduler_only
            if not shared and self.engine.memory.shared:
                log.info("kvcore: vLLM's workers run in other processes than its scheduler: "
                         "lookups ask the kvcore server the workers store into")
            elif not shared:
                log.info("kvcore: vLLM's workers run in other processes than its scheduler: "
                         "lookups use a mirror of the worker's CPU-tier keys (sent back each "
                         "step) and the shared lower tiers")
            namespace = engine_namespace(vllm_config, kv_cache_config, rank=0)
            self.scheduler = SchedulerSide(
                self.engine, namespace, block_size, blocks_per_chunk, worker_in_process=shared,
                async_loads=self.plugin_settings.async_loads, verify_sample=settings.verify_sample)
        else:
            rank = _worker_rank(vllm_config)
            namespace = engine_namespace(vllm_config, kv_cache_config, rank=rank)
            self.worker = WorkerSide(
                self.engine, namespace, block_size, blocks_per_chunk, layer_names,
                layerwise=self.plugin_settings.layerwise,
                load_timeout_s=self.plugin_settings.load_timeout_s,
                store_timeout_s=self.plugin_settings.store_timeout_s,
                verify_tolerance=settings.verify_tolerance)

        # The controller lists the namespace under the served model name and routes by it.
        self.engine.declare_namespace(namespace, served_as=served_names(vllm_config))
        # Counters for vLLM's /metrics, from the connector that owns the engine: the worker,
        # or a scheduler whose workers run elsewhere (in one process both share the engine).
        self._stats = (StatsDelta(self.engine, self.plugin_settings.stats_interval_s)
                       if role != KVConnectorRole.SCHEDULER or scheduler_only else None)

    @contextmanager
    def _timed(self, what: str) -> Iterator[None]:
        """Time spent in the connector on vLLM's critical path (metric vllm_connector_seconds)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.engine is not None:
                self.engine.metrics.observe("vllm_connector_seconds",
                                            time.perf_counter() - started, what)

    @property
    def _worker_failures(self) -> FailureLog | None:
        return self.worker.failures if self.worker is not None else None

    @property
    def _scheduler_failures(self) -> FailureLog | None:
        return self.scheduler.failures if self.scheduler is not None else None

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a dropped store is only a future miss

    def counters(self) -> dict[str, float]:
        """The connector's own kvcore metrics (``vllm_*``)."""
        return counters(self.engine)

    # ==============================
    # Worker side
    # ==============================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self.worker is not None
        self.worker.register_kv_caches(kv_caches)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if self.worker is not None and isinstance(kv_connector_metadata, KVCoreMetadata):
            try:
                self.worker.cancel_stores(kv_connector_metadata.preempted)
            except Exception as exc:
                self.worker.failures.record("cancelling stores", exc)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        self._step_started, self._step_loading_s = time.perf_counter(), 0.0
        if self.worker is not None:
            self.worker.begin_step()

    def _observe_step(self, meta: KVConnectorMetadata) -> None:
        """The step's forward time (bind to save, less kvcore's own loading) for the planner.
        vLLM on CPU runs the forward synchronously in between; on a GPU it would have to be
        synchronised first, so only CPU steps are timed."""
        started = self._step_started
        if (started is None or self.worker is None or not isinstance(meta, KVCoreMetadata)
                or not meta.step or torch.cuda.is_initialized()):
            return
        seconds = time.perf_counter() - started - self._step_loading_s
        self._step_started = None
        self.worker.engine.observe_prefill(meta.step, seconds)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if self.worker is None or not isinstance(meta, KVCoreMetadata):
            return
        self.handle_preemptions(meta)
        loading = time.perf_counter()
        try:
            with self._timed("start_load_kv"):
                self.worker.start_load(meta)
        except Exception as exc:
            for spec in meta.loads:
                if not spec.is_async:
                    self.worker.fail_blocks(spec.block_ids)
            self.worker.failures.record("load", exc)
        finally:
            self._step_loading_s = time.perf_counter() - loading

    @guarded("layer-wise load", failures="_worker_failures")
    def wait_for_layer_load(self, layer_name: str) -> None:
        if self.worker is not None:
            self.worker.wait_for_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        return  # whole blocks are stored after the step, in wait_for_save

    def wait_for_save(self) -> None:
        if self.worker is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        try:
            self._observe_step(meta)
            with self._timed("wait_for_save"):
                self.worker.finish_layerwise()
                if isinstance(meta, KVCoreMetadata):
                    self.worker.submit_stores(meta)
        except Exception as exc:
            self.worker.failures.record("store", exc)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self.worker is None:
            return None, None
        try:
            with self._timed("get_finished"):
                sending, received = self.worker.get_finished(finished_req_ids)
        except Exception as exc:
            self.worker.failures.record("get_finished", exc)
            sending, received = set(), set()
        return (sending or None), (received or None)

    @guarded("worker metadata", failures="_worker_failures")
    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        return self.worker.take_worker_meta() if self.worker is not None else None

    def get_block_ids_with_load_errors(self) -> set[int]:
        if self.worker is None:
            return set()
        self.worker.finish_layerwise()
        return self.worker.take_load_errors()

    @property
    def _failures(self) -> FailureLog | None:
        return self._worker_failures or self._scheduler_failures

    @guarded("metrics for vLLM", failures="_failures")
    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """The engine's counter increases since the last report, for vLLM's /metrics (both
        roles call this; only the one owning the engine answers)."""
        return self._stats.take() if self._stats is not None else None

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: Any = None) -> bool:
        """vLLM 0.33 asks this when ``enable_sleep_mode`` is on: no, since kvcore's background
        stores and loads could still read KV memory that sleep mode remaps (vLLM then refuses
        to start with a clear error instead)."""
        return False

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None
                                 ) -> KVConnectorStats | None:
        return KVCoreStats(data=data) if data is not None else KVCoreStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig,
                           metric_types: dict[type[PromMetric], type[PromMetricT]],
                           labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]
                           ) -> KVConnectorPromMetrics | None:
        """Where vLLM serves /metrics: kvcore's counters as ``kvcore_*`` families."""
        return KVCorePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.close()
        if self.engine is not None:
            engine, self.engine = self.engine, None  # type: ignore[assignment]
            release_engine(engine)

    # ==============================
    # Scheduler side
    # ==============================

    def bind_kv_cache_manager(self, kv_cache_manager: KVCacheManager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        if self.scheduler is not None:
            self.scheduler.kv_cache_manager = kv_cache_manager

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if self.scheduler is not None and connector_output.kv_connector_worker_meta is not None:
            try:
                self.scheduler.apply_worker_meta(connector_output.kv_connector_worker_meta)
            except Exception as exc:
                self.scheduler.failures.record("worker metadata", exc)

    def on_new_request(self, request: Request) -> None:
        if self.scheduler is not None:
            with self._timed("on_new_request"):
                self.scheduler.on_new_request(request)

    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self.scheduler is not None
        with self._timed("get_num_new_matched_tokens"):
            return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        assert self.scheduler is not None
        self.scheduler.update_state_after_alloc(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self.scheduler is not None
        with self._timed("build_connector_meta"):
            return self.scheduler.build_meta(scheduler_output)

    def request_finished(self, request: Request,
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self.scheduler is not None
        return self._request_finished(request)

    @guarded("request_finished", default=(False, None), failures="_scheduler_failures")
    def _request_finished(self, request: Request) -> tuple[bool, dict[str, Any] | None]:
        assert self.scheduler is not None
        return self.scheduler.request_finished(request), None


def _require_recompute_policy(transfer: Any) -> None:
    """Make vLLM recompute blocks whose load failed (``kv_load_failure_policy=recompute``).

    vLLM's scheduler reads the policy from the engine's top-level transfer config after it
    built the connector. Inside vLLM's MultiConnector this connector gets a copy of that
    config: the policy is then set on the MultiConnector's own config (found as the instance
    that is constructing this one). If neither can be set, kvcore refuses to start: a failed
    load would otherwise end the request with an error.
    """
    transfer.kv_load_failure_policy = "recompute"
    parent = _constructing_multi_connector()
    if parent is None:
        return
    top = getattr(getattr(parent, "_vllm_config", None), "kv_transfer_config", None)
    if top is None:
        raise ConfigError(
            "kvcore inside vLLM's MultiConnector cannot set kv_load_failure_policy: set "
            "\"kv_load_failure_policy\": \"recompute\" in the top-level --kv-transfer-config "
            "(or KVCORE_VLLM_LOAD_FAILURE_POLICY=fail to accept failed requests)")
    if top.kv_load_failure_policy != "recompute":
        log.info("kvcore: inside MultiConnector: setting its kv_load_failure_policy to "
                 "recompute (a chunk that fails to load is recomputed)")
        top.kv_load_failure_policy = "recompute"


def _constructing_multi_connector() -> Any:
    """The vLLM MultiConnector whose ``__init__`` is building this connector, if any."""
    try:
        from vllm.distributed.kv_transfer.kv_connector.v1.multi_connector import MultiConnector
    except Exception:
        return None
    frame = sys._getframe(1)
    for _ in range(8):
        frame = frame.f_back  # type: ignore[assignment]
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, MultiConnector):
            return candidate
    return None
