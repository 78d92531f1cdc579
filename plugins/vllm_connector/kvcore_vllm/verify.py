"""Verified hits: compare the KV vLLM recomputed for a sampled hit with kvcore's stored copy.

The scheduler side lets vLLM recompute a fraction (``KVCORE_VERIFY_SAMPLE``) of the requests
that would hit. Once vLLM has computed those chunks, the worker gathers their blocks (at once:
vLLM reuses blocks after the step) and this module compares them, in a background thread, with
what kvcore holds under the same keys. A chunk that differs by more than
``KVCORE_VERIFY_TOLERANCE`` (relative to the element's magnitude, at least 1) is counted
(``verify_mismatch_total``), deleted from every tier, replaced by the fresh KV, and logged once
with its namespace and chunk index. What could cause one: a chunk stored under the wrong key
or namespace, layers or blocks out of order, KV computed over a wrong context, bit flips on a
path no checksum covers. A chunk that entered memory through a lossy codec (``int8``) is
compared with the codec's round trip of the fresh KV, so its expected difference is exactly 0.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from kvcore.background import lower_priority
from kvcore.engine import CacheEngine
from kvcore.keys import NAMESPACE_BYTES, ChunkKey

log = logging.getLogger("vllm.kvcore")

MAX_PENDING = 4
"""Verifications waiting for the comparison thread; more are skipped (bounded memory)."""

_live: weakref.WeakSet[Verifier] = weakref.WeakSet()


def live_verifiers() -> list[Verifier]:
    """The verifiers of this process's workers (benchmarks, tests)."""
    return list(_live)


def as_float32(raw: np.ndarray, dtype: Any) -> np.ndarray | None:
    """KV bytes as float32 values, for the dtypes vLLM uses; None for others (fp8, ...)."""
    name = str(dtype).removeprefix("torch.")
    if name == "bfloat16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if name == "float16":
        return raw.view(np.float16).astype(np.float32)
    if name == "float32":
        return raw.view(np.float32)
    return None


def kv_difference(stored: Any, fresh: np.ndarray, dtype: Any) -> float:
    """0.0 for identical bytes; else the largest element difference relative to the larger
    magnitude (at least 1); ``inf`` for a size mismatch, NaN, or a dtype compared by bytes."""
    a = np.frombuffer(stored, dtype=np.uint8)
    if a.nbytes != fresh.nbytes:
        return math.inf
    if np.array_equal(a, fresh):
        return 0.0
    fa, fb = as_float32(a, dtype), as_float32(fresh, dtype)
    if fa is None or fb is None:
        return math.inf
    with np.errstate(invalid="ignore", over="ignore"):
        scale = np.maximum(1.0, np.maximum(np.abs(fa), np.abs(fb)))
        err = np.abs(fa - fb) / scale
    if np.isnan(err).any():
        return math.inf
    return float(err.max())


class Verifier:
    """Compares recomputed chunks with kvcore's copies in one background thread."""

    def __init__(self, engine: CacheEngine, tolerance: float) -> None:
        self.engine = engine
        self.tolerance = tolerance
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvcore-verify",
                                        initializer=lower_priority,
                                        initargs=(engine.settings.background_nice,))
        self._pending = 0
        self._lock = threading.Lock()
        self._logged = False
        self.worst_accepted = 0.0
        """Largest difference accepted so far (within the tolerance)."""
        _live.add(self)

    def submit(self, keys: Sequence[ChunkKey], source: Any, dtype: Any, first_chunk: int) -> bool:
        """Gather the fresh KV of ``keys`` from ``source`` now; compare later. False when
        skipped because too many comparisons are waiting."""
        with self._lock:
            if self._pending >= MAX_PENDING:
                self.engine.metrics.inc("verify_skipped_total")
                return False
            self._pending += 1
        try:
            nbytes = source.chunk_nbytes()
            fresh = [np.empty(nbytes, dtype=np.uint8) for _ in keys]
            source.fill(list(range(len(keys))), fresh)
            self._pool.submit(self._compare, list(keys), fresh, dtype, first_chunk)
        except BaseException:
            with self._lock:
                self._pending -= 1
            raise
        return True

    def _compare(self, keys: list[ChunkKey], fresh: list[np.ndarray], dtype: Any,
                 first_chunk: int) -> None:
        try:
            mismatched: list[tuple[int, float]] = []
            with self.engine.acquire(keys) as lease:
                for i, view in enumerate(lease.views):
                    # a chunk loaded through a lossy codec is compared with the same codec
                    # applied to the fresh KV (deterministic), not with the raw recompute
                    expected = self.engine.codecs.as_loaded(keys[i], fresh[i])
                    worst = kv_difference(view, expected, dtype)
                    self.engine.metrics.inc("verify_chunks_total")
                    if worst == 0.0:
                        self.engine.metrics.inc("verify_exact_total")
                    elif worst <= self.tolerance:
                        self.engine.metrics.inc("verify_within_tolerance_total")
                        self.worst_accepted = max(self.worst_accepted, worst)
                        self.engine.metrics.observe("verify_difference", worst)
                    else:
                        mismatched.append((i, worst))
            for i, worst in mismatched:
                self._replace(keys[i], fresh[i], first_chunk + i, worst)
        except Exception as exc:
            self.engine.metrics.inc("verify_errors_total")
            log.warning("kvcore: verification failed (%s: %s)", type(exc).__name__, exc)
        finally:
            with self._lock:
                self._pending -= 1

    def _replace(self, key: ChunkKey, fresh: np.ndarray, chunk: int, worst: float) -> None:
        self.engine.metrics.inc("verify_mismatch_total")
        self.engine.delete([key])
        self.engine.store_buffers([key], [fresh.data])
        if not self._logged:
            self._logged = True
            log.error(
                "kvcore: verification: chunk %d of namespace %s differs from vLLM's recompute "
                "(largest relative difference %.3g, KVCORE_VERIFY_TOLERANCE=%g); deleted from "
                "every tier and replaced (verify_mismatch_total counts further ones)",
                chunk, key[:NAMESPACE_BYTES].hex(), worst, self.tolerance)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every submitted comparison is done (tests)."""
        done = threading.Event()

        def mark() -> None:
            done.set()

        self._pool.submit(mark)
        return done.wait(timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
