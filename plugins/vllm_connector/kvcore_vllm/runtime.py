"""One CacheEngine per process, shared by the scheduler-side and worker-side connectors.

With one worker on CPU (and with vLLM's uniprocess executor in general) the scheduler and the
worker live in the same process: both roles then use the same CacheEngine, so the scheduler's
lookup sees exactly what the worker stored. Engines are keyed by their settings and closed when
the last connector using them shuts down.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from kvcore.config import Settings
from kvcore.engine import CacheEngine
from kvcore_vllm.verify import live_verifiers

log = logging.getLogger("vllm.kvcore")

_lock = threading.Lock()
_engines: dict[str, tuple[CacheEngine, int]] = {}


def _key(settings: Settings) -> str:
    return settings.model_dump_json()


def acquire_engine(settings: Settings, attachments: bool = True) -> CacheEngine:
    """The process-wide engine for ``settings`` (created on first use).

    ``attachments=False`` for a scheduler whose worker runs in another process: its engine
    holds no KV, so it neither reports to the controller nor serves its CPU tier to peers (the
    worker's engine does both). It applies when the engine is created; a connector in the same
    process reuses the engine as it is (vLLM creates the worker's connector before the
    scheduler's).
    """
    key = _key(settings)
    with _lock:
        engine, users = _engines.get(key, (None, 0))
        if engine is None:
            engine = CacheEngine(settings, attachments=attachments)
            log.info("kvcore: CacheEngine started (tiers %s, chunk %d tokens)",
                     ",".join(settings.tiers), settings.chunk_size)
        _engines[key] = (engine, users + 1)
        return engine


def release_engine(engine: CacheEngine) -> None:
    """Drop one user; the last one closes the engine."""
    with _lock:
        for key, (held, users) in list(_engines.items()):
            if held is engine:
                if users <= 1:
                    del _engines[key]
                    engine.close()
                else:
                    _engines[key] = (held, users - 1)
                return


def flush_all(timeout: float = 30.0) -> None:
    """Wait for every worker's pending verifications, then every engine's queued stores and
    write-behind (tests, benchmarks)."""
    for verifier in live_verifiers():
        verifier.flush(timeout)
    with _lock:
        engines = [e for e, _ in _engines.values()]
    for engine in engines:
        engine.flush(timeout)


def counters(engine: CacheEngine, prefix: str = "vllm_") -> dict[str, float]:
    """The engine's counters whose names start with ``prefix``, summed over labels."""
    out: dict[str, float] = {}
    for name, by_label in engine.metrics.snapshot()["counters"].items():
        if name.startswith(prefix):
            out[name] = sum(by_label.values())
    return out


def report() -> dict[str, Any]:
    """kvcore stats of this process's engine and the connector's counters (``vllm_*``)."""
    with _lock:
        engines = [e for e, _ in _engines.values()]
    if not engines:
        return {"kvcore": {}, "connector": {}}
    return {"kvcore": engines[0].stats(), "connector": counters(engines[0])}
