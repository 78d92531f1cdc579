"""KVCORE_LOWER_ADMISSION=reused on a real LMDB tier: a chunk asked for once stays in memory
only; asked again (a memory hit, or a miss after it left memory) it is written below."""

from __future__ import annotations

import pytest

from kvcore.config import ConfigError, load_settings
from kvcore.engine import CacheEngine
from kvcore.keys import Namespace
from kvcore.plugins import PluginRegistry

CHUNK = 4
PAYLOAD = 4096
NS = Namespace("lmdb-admission")


def _engine(env, path, admission: str, cpu_chunks: int = 64) -> CacheEngine:
    env.setenv("KVCORE_LMDB_PATH", str(path))
    env.setenv("KVCORE_LMDB_SIZE", "64MiB")
    settings = load_settings(tiers=["cpu", "lmdb"], chunk_size=CHUNK,
                             cpu_size=cpu_chunks * PAYLOAD, lower_admission=admission,
                             eviction="lru")
    return CacheEngine(settings, registry=PluginRegistry().load(["lmdb"]))


def _ask_and_store(engine: CacheEngine, keys: list[bytes]) -> int:
    hits = engine.lookup(keys, prefetch=False).chunks
    if hits < len(keys):
        payloads = [bytes([i % 251]) * PAYLOAD for i in range(len(keys))]
        assert engine.store_buffers(keys, payloads).wait(10) >= 0
    assert engine.flush(30)
    return hits


def _below(engine: CacheEngine, keys: list[bytes]) -> list[bool]:
    (lmdb,) = engine.lower
    return lmdb.contains(keys)


def test_reused_writes_a_chunk_below_on_its_second_ask(tmp_path, kvcore_env) -> None:
    engine = _engine(kvcore_env, tmp_path, "reused")
    try:
        once = engine.keys_for(NS, range(3 * CHUNK))
        assert _ask_and_store(engine, once) == 0
        assert _below(engine, once) == [False] * 3  # asked once: memory only
        assert engine.metrics.get("bytes_written_total", "lmdb") == 0
        assert _ask_and_store(engine, once[:2]) == 2  # asked again, hit in memory
        assert _below(engine, once) == [True, True, False]
        engine.clear(tier="cpu")  # the third chunk left memory before its second ask
        assert _ask_and_store(engine, once[:2]) == 2  # from LMDB
        assert _ask_and_store(engine, once) == 2  # the third is a miss, stored again
        assert _below(engine, once) == [True, True, True]
    finally:
        engine.close()


def test_all_writes_every_stored_chunk(tmp_path, kvcore_env) -> None:
    engine = _engine(kvcore_env, tmp_path, "all")
    try:
        keys = engine.keys_for(NS, range(3 * CHUNK))
        assert _ask_and_store(engine, keys) == 0
        assert _below(engine, keys) == [True] * 3
    finally:
        engine.close()


def test_unknown_admission_names_the_setting(kvcore_env) -> None:
    kvcore_env.setenv("KVCORE_LOWER_ADMISSION", "sometimes")
    with pytest.raises(ConfigError, match="KVCORE_LOWER_ADMISSION='sometimes'.*'all' or 'reused'"):
        load_settings()
