"""Redis below ``kvcore server``: one Redis connection pool per host, owned by the server. A
real server process and a real redis-server; the engines attach as an engine does. A Redis
that stops answering delays no store or load of shared memory, and a lookup waits at most
``KVCORE_SERVER_TIMEOUT_S``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("zmq")
pytest.importorskip("msgspec")

from kvcore.config import load_settings  # noqa: E402
from kvcore.engine import CacheEngine  # noqa: E402
from kvcore.keys import Namespace  # noqa: E402
from kvcore.testing.server import ServerProcess, serving  # noqa: E402
from kvcore_redis.server import RedisServer  # noqa: E402

NS = Namespace("redis-behind-server")
CHUNK = 4
CHUNK_BYTES = 1 << 15


def values(n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, CHUNK_BYTES, dtype=np.uint8).tobytes() for _ in range(n)]


@pytest.fixture
def redis(new_server: Callable[..., RedisServer]) -> RedisServer:
    return new_server()


@pytest.fixture
def server(tmp_path: Path, redis: RedisServer,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[ServerProcess]:
    """A server whose memory holds 4 chunks, with Redis below it (short Redis timeouts)."""
    srv = ServerProcess(tmp_path, budget=4 * CHUNK_BYTES, env={
        "KVCORE_TIERS": "cpu,redis", "KVCORE_REDIS_URL": redis.url,
        "KVCORE_REDIS_SOCKET_TIMEOUT_S": "0.5", "KVCORE_REDIS_CONNECT_TIMEOUT_S": "0.5",
        "KVCORE_TIER_TIMEOUT_S": "0.5", "KVCORE_CHUNK_SIZE": str(CHUNK)})
    yield from serving(srv, monkeypatch.setenv)


def attached() -> CacheEngine:
    return CacheEngine(load_settings(chunk_size=CHUNK))


def test_a_prefix_comes_back_from_the_servers_redis(server: ServerProcess,
                                                    redis: RedisServer) -> None:
    tokens = list(range(4 * CHUNK))
    stored = values(4, seed=1)
    with attached() as a:
        keys = a.keys_for(NS, tokens)
        a.store_buffers(keys, stored).wait(10)
        assert a.flush()  # written behind to Redis by the server
        assert len(redis.client().keys("*")) >= 4
        other = a.keys_for(NS, list(range(500, 500 + 4 * CHUNK)))
        a.store_buffers(other, values(4, seed=2)).wait(10)  # takes the whole memory
        assert a.lookup(other).by_tier == {"server": 4}
    with attached() as b:
        keys = b.keys_for(NS, tokens)
        assert b.lookup(keys).by_tier == {"redis": 4}
        with b.acquire(keys) as lease:
            assert [bytes(v) for v in lease.views] == stored


def test_a_stopped_redis_delays_no_store_and_bounds_every_lookup(
        server: ServerProcess, redis: RedisServer) -> None:
    with attached() as a:
        cold = a.keys_for(NS, list(range(900, 900 + 2 * CHUNK)))
        redis.pause()  # SIGSTOP: connections stay open, nothing answers
        try:
            started = time.monotonic()
            result = a.lookup(cold)  # memory misses: the server asks Redis, which hangs
            assert result.chunks == 0
            assert time.monotonic() - started < 2.5  # the server's tier timeout, not a hang
            # Shared memory keeps working meanwhile: its requests use the other socket.
            tokens = list(range(100, 100 + 2 * CHUNK))
            keys = a.keys_for(NS, tokens)
            stored = values(2, seed=3)
            a.store_buffers(keys, stored).wait(10)
            assert a.lookup(keys).by_tier == {"server": 2}
            with a.acquire(keys) as lease:
                assert [bytes(v) for v in lease.views] == stored
        finally:
            redis.resume()
