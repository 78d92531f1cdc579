"""KVCORE_REDIS_CODEC on a real redis-server: fewer bytes in Redis, another engine reads them
back (int8 as the codec's deterministic round trip), a value rewritten in Redis is a miss."""

from __future__ import annotations

import numpy as np

from kvcore.config import load_settings
from kvcore.engine import CacheEngine
from kvcore.keys import Namespace
from kvcore.plugins import PluginRegistry

CHUNK = 16
NS = Namespace("redis-codec", dtype="bfloat16")


def kv(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal(n) * np.repeat(rng.uniform(0.1, 6, n // 64 + 1), 64)[:n])
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()


def _engine(env, url: str, codec: str) -> CacheEngine:
    env.setenv("KVCORE_REDIS_URL", url)
    env.setenv("KVCORE_REDIS_CODEC", codec)
    env.setenv("KVCORE_REDIS_PREFIX", "codec-test:")
    return CacheEngine(load_settings(tiers=["cpu", "redis"], chunk_size=CHUNK),
                       registry=PluginRegistry().load(["redis"]))


def test_int8_in_redis_is_smaller_and_read_back_by_another_engine(
        redis_server, redis_url, kvcore_env) -> None:
    payloads = [kv(64 * 1024, seed=i) for i in range(3)]
    first = _engine(kvcore_env, redis_url, "int8")
    try:
        keys = first.keys_for(NS, range(3 * CHUNK))
        assert first.store_buffers(keys, payloads).wait(10) == 3
        assert first.flush(30)
    finally:
        first.close()
    client = redis_server.client()
    stored = [k for k in client.keys("codec-test:*")]
    in_redis = sum(client.strlen(k) for k in stored)
    assert 0 < in_redis < 0.6 * sum(map(len, payloads))
    second = _engine(kvcore_env, redis_url, "none")
    try:
        with second.acquire(keys) as lease:
            loaded = [bytes(v) for v in lease.views]
        assert len(loaded) == 3
        second.note_namespace(NS)
        for key, got, sent in zip(keys, loaded, payloads):
            assert got == second.codecs.as_loaded(key, np.frombuffer(sent, np.uint8)).tobytes()
        second.clear(tier="cpu")
        for k in stored:  # rewrite every value: same length, other bytes
            value = bytearray(client.get(k))
            value[-10] ^= 0x01
            client.set(k, bytes(value))
        with second.acquire(keys) as lease:
            assert len(lease) == 0
        assert second.metrics.get("corrupt_chunks_total", "redis") >= 1
    finally:
        second.clear()
        second.close()
