"""The SGLang HiCache storage backend on kvcore: ``KVCoreHiCacheStorage``.

SGLang creates it through its storage backend factory::

    --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "kvcore",
        "module_path": "kvcore_sglang.backend", "class_name": "KVCoreHiCacheStorage",
        "interface_v1": 1}'

then calls :meth:`register_mem_pool_host` with its host KV pool. Each SGLang page is one kvcore
chunk, keyed under a namespace of model, dtype, page layout, geometry, shard and tenant
(:mod:`kvcore_sglang.keys`). Pages go to kvcore's CPU tier and, write-behind, to the lower tiers of
``KVCORE_TIERS`` (lmdb, redis, ...).

Semantics, as SGLang's cache controller uses them:

- ``batch_exists`` returns the length of the leading run of pages found in any tier (and starts
  moving lower-tier hits into memory for the get that follows);
- ``batch_get``/``batch_get_v1`` load the leading run through every tier, and later pages from
  memory only; the controller uses only the leading run;
- ``batch_set``/``batch_set_v1`` return once the pages are in the CPU tier (a page already stored
  counts as stored);
- any failure, in a tier or here, is a miss (``False``/``None``/``0``), logged once per kind,
  never an exception into SGLang.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig

from kvcore.config import Settings, load_settings
from kvcore.engine import CacheEngine
from kvcore.failures import FailureLog
from kvcore.keys import ChunkKey, Namespace
from kvcore_sglang.keys import PageFormat, ShardInfo, namespace_for, page_format_of, page_keys
from kvcore_sglang.pages import (
    HostPages,
    gather_page,
    page_nbytes,
    scatter_page,
    tensor_bytes,
)
from kvcore_sglang.settings import SGLangSettings, from_extra_config

log = logging.getLogger("sglang.kvcore")  # under sglang. so SGLang's logging config shows it

T = TypeVar("T")


class _PageSource:
    """Engine store source over host-pool pages; refuses to read after the caller gave up."""

    def __init__(self, pages: list[list[np.ndarray]]) -> None:
        self.pages = pages
        self._lock = threading.Lock()
        self._cancelled = False

    def chunk_nbytes(self) -> int:
        return page_nbytes(self.pages[0]) if self.pages else 0

    def fill(self, indices: Sequence[int], dests: Sequence[np.ndarray]) -> None:
        with self._lock:
            if self._cancelled:
                raise TimeoutError("the page set was abandoned; host pages may be reused")
            for i, dest in zip(indices, dests):
                gather_page(self.pages[i], dest)

    def cancel(self) -> None:
        with self._lock:  # waits for a fill in progress, then forbids later ones
            self._cancelled = True


class KVCoreHiCacheStorage(HiCacheStorage):
    """kvcore's tiers behind SGLang's ``HiCacheStorage`` interface (generic and zero-copy v1)."""

    def __init__(
        self,
        storage_config: HiCacheStorageConfig,
        kwargs: dict[str, Any] | None = None,
        *,
        engine: CacheEngine | None = None,
    ) -> None:
        extra = dict(storage_config.extra_config or {})
        self.storage_config = storage_config
        self.options: SGLangSettings = from_extra_config(extra)
        self.zero_copy = bool(extra.get("interface_v1", 0))
        self.shard = ShardInfo.from_storage_config(storage_config, self.options.model)
        overrides = extra.get("kvcore") or {}
        self._core_settings: Settings = load_settings(**overrides)  # bad config fails at start
        self._engine = engine
        self._own_engine = engine is None
        self._engine_lock = threading.Lock()
        self._pages: HostPages | None = None
        # Until SGLang registers its host pool, pages set through the generic interface are
        # keyed by what the storage config says; register_mem_pool_host pins the real format.
        layout = "page_first" if storage_config.is_page_first_layout else "unknown"
        self._format = PageFormat(layout=f"sglang:{layout}")
        self._namespaces: dict[str, Namespace] = {}
        self.failures = FailureLog(log, "treated as a miss", prefix="kvcore ")
        """Every failure: logged once per kind, never raised into SGLang."""
        self.mem_pool_host: Any = None

    # -- setup ---------------------------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Bind SGLang's host KV pool: fixes the page format, and the engine's chunk size."""
        super().register_mem_pool_host(mem_pool_host)
        self._format = page_format_of(mem_pool_host, self.zero_copy)
        self._namespaces.clear()
        if self.zero_copy:
            self._pages = HostPages(mem_pool_host)
        if self._engine is None and "chunk_size" not in self._core_settings.model_fields_set:
            page = int(getattr(mem_pool_host, "page_size", 0) or 0)
            if page > 0:
                self._core_settings = self._core_settings.model_copy(update={"chunk_size": page})

    @property
    def engine(self) -> CacheEngine:
        """The kvcore engine (created on first use, after the host pool is known)."""
        if self._engine is None:
            with self._engine_lock:
                if self._engine is None:
                    self._engine = CacheEngine(self._core_settings)
        return self._engine

    def namespace(self, tenant: str | None = None) -> Namespace:
        """The namespace of this rank's pages for ``tenant`` (default: the configured one)."""
        tenant = self.options.tenant if tenant is None else tenant
        ns = self._namespaces.get(tenant)
        if ns is None:
            ns = self._namespaces[tenant] = namespace_for(self.shard, self._format, tenant)
            # Its dtype for the tiers' codecs. The configured tenant's is listed by the
            # controller under the model name (keys are SGLang's page hashes: not routable by
            # token ids); the others' are remembered as seen.
            if tenant == self.options.tenant:
                self.engine.declare_namespace(ns, served_as=[self.shard.model],
                                              keyed_by="engine")
            else:
                self.engine.note_namespace(ns)
        return ns

    def _keys(self, keys: Sequence[str], extra_info: Any = None) -> list[ChunkKey]:
        tenant = None
        info = getattr(extra_info, "extra_info", None)
        if isinstance(info, dict) and info.get("tenant") is not None:
            tenant = str(info["tenant"])
        namespace = self.namespace(tenant)
        return page_keys(namespace.digest, list(keys), namespace.tenant)

    def _guard(self, what: str, default: T, fn: Callable[[], T]) -> T:
        return self.failures.guard(what, default, fn)

    # -- holding pages -------------------------------------------------------------------------

    def _hold(self, keys: list[ChunkKey]) -> tuple[list[memoryview | None], Callable[[], None]]:
        """Views of stored pages: the leading run through every tier, the rest from memory."""
        engine = self.engine
        lease = engine.acquire(keys)
        n = len(lease)
        try:
            rest = engine.memory.acquire(keys[n + 1 :]) if n + 1 < len(keys) else []
        except Exception:
            lease.close()
            raise
        views: list[memoryview | None] = [*lease.views, *([None] if n < len(keys) else []), *rest]

        def release() -> None:
            lease.close()
            engine.memory.release(rest)

        return views, release

    def _store(self, keys: list[ChunkKey], source: Any) -> list[bool]:
        engine = self.engine
        handle = engine.store(keys, source)
        try:
            handle.wait(self.options.store_timeout_s)
        except Exception:
            if isinstance(source, _PageSource):
                source.cancel()
            raise
        return [bool(x) for x in engine.memory.contains(keys)]

    # -- existence -----------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        return self._guard("exists", False, lambda: self.batch_exists([key]) == 1)

    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        """Number of leading pages found in any tier (SGLang's definition)."""
        if not keys:
            return 0
        return self._guard(
            "batch_exists", 0, lambda: self.engine.lookup(self._keys(keys, extra_info)).chunks
        )

    # -- generic interface (tensors in, tensors out) -------------------------------------------

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> Any:
        targets = [target_location] if target_location is not None else None
        return self._guard("get", None, lambda: self._batch_get([key], targets)[0])

    def batch_get(
        self, keys: list[str], target_locations: Any = None, target_sizes: Any = None
    ) -> list[Any]:
        return self._guard("batch_get", [None] * len(keys),
                           lambda: self._batch_get(keys, target_locations))

    def _batch_get(self, keys: list[str], targets: Any) -> list[Any]:
        views, release = self._hold(self._keys(keys))
        try:
            return [self._into_target(view, targets[i] if targets else None)
                    for i, view in enumerate(views)]
        finally:
            release()

    def _into_target(self, view: memoryview | None, target: Any) -> Any:
        if view is None:
            return None
        src = np.frombuffer(view, dtype=np.uint8)
        if target is None and self.mem_pool_host is not None:
            target = self.mem_pool_host.get_dummy_flat_data_page()
        elif target is None:
            target = torch.empty(src.nbytes, dtype=torch.uint8)
        if not isinstance(target, torch.Tensor):
            return None
        if target.numel() * target.element_size() != src.nbytes:
            return None
        if target.is_contiguous() and target.device.type == "cpu":
            np.copyto(tensor_bytes(target), src)
        else:
            staged = torch.from_numpy(src.copy()).view(target.dtype).reshape(target.shape)
            target.copy_(staged)
        return target

    def set(self, key: str, value: Any = None, target_location: Any = None,
            target_sizes: Any = None) -> bool:
        return self._guard("set", False, lambda: self._batch_set([key], [value])[0])

    def batch_set(self, keys: list[str], values: Any = None, target_locations: Any = None,
                  target_sizes: Any = None) -> bool:
        if not keys:
            return True
        return self._guard("batch_set", False, lambda: all(self._batch_set(keys, values)))

    def _batch_set(self, keys: list[str], values: Any) -> list[bool]:
        if values is None or len(values) != len(keys):
            return [False] * len(keys)
        buffers = [tensor_bytes(v) for v in values]
        ok = [True] * len(keys)
        by_size: dict[int, list[int]] = {}
        for i, buf in enumerate(buffers):
            by_size.setdefault(buf.nbytes, []).append(i)
        kv_keys = self._keys(keys)
        for indices in by_size.values():  # one engine store per chunk size
            stored = self._store([kv_keys[i] for i in indices],
                                 _PageSource([[buffers[i]] for i in indices]))
            for i, hit in zip(indices, stored):
                ok[i] = hit
        return ok

    # -- zero-copy interface (host pool pages in place) ----------------------------------------

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: Any = None) -> list[bool]:
        """Load pages straight into the host pool at ``host_indices`` (page i at i*page_size)."""
        return self._guard("batch_get_v1", [False] * len(keys),
                           lambda: self._get_v1(keys, host_indices, extra_info))

    def _get_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any) -> list[bool]:
        if not keys:
            return []
        pages = self._host_pages()
        views, release = self._hold(self._keys(keys, extra_info))
        try:
            hits = [v is not None for v in views]
            targets = pages.pages(host_indices, len(keys))
            for i, view in enumerate(views):
                if view is None:
                    continue
                if view.nbytes != page_nbytes(targets[i]):
                    hits[i] = False
                    continue
                scatter_page(np.frombuffer(view, dtype=np.uint8), targets[i])
            return hits
        finally:
            release()

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: Any = None) -> list[bool]:
        """Store pages straight from the host pool at ``host_indices``."""
        return self._guard("batch_set_v1", [False] * len(keys),
                           lambda: self._set_v1(keys, host_indices, extra_info))

    def _set_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any) -> list[bool]:
        if not keys:
            return []
        pages = self._host_pages().pages(host_indices, len(keys))
        return self._store(self._keys(keys, extra_info), _PageSource(pages))

    def _host_pages(self) -> HostPages:
        if self._pages is None:
            if self.mem_pool_host is None:
                raise RuntimeError("no host KV pool registered (register_mem_pool_host)")
            self._pages = HostPages(self.mem_pool_host)
        return self._pages

    # -- management ----------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        self._guard("delete", 0, lambda: self.engine.delete(self._keys([key])))

    def clear(self) -> None:
        """Remove this rank's pages (every tenant's namespace it has used) from every tier."""
        def run() -> None:
            for ns in {*self._namespaces.values(), self.namespace()}:
                self.engine.clear(ns)
        self._guard("clear", None, run)

    def get_stats(self) -> Any:
        return None

    def close(self) -> None:
        if self._engine is not None and self._own_engine:
            self._guard("close", None, self._engine.close)
