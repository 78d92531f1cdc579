"""Real redis-server processes on loopback: one server, a 3-node cluster, fresh ones on demand.

A missing ``redis-server`` FAILS the tests (CI installs it); it never skips them. A clean
KVCORE_* environment and ``figure`` come from kvcore's pytest plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from kvcore_redis import RedisSettings, RedisTier
from kvcore_redis.server import RedisClusterServers, RedisMissing, RedisServer


def _require_binary() -> None:
    from kvcore_redis.server import find_redis_server

    try:
        find_redis_server()
    except RedisMissing as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One server for the session (flushed before each test that takes ``redis_url``)."""
    _require_binary()
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.client().flushall()
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    """A real 3-node Redis Cluster (no replicas) for the session."""
    _require_binary()
    cluster = RedisClusterServers(3)
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_url(redis_cluster: RedisClusterServers) -> str:
    for node in redis_cluster.nodes:
        node.client().flushall()
    return redis_cluster.url


@pytest.fixture
def new_server() -> Iterator[Callable[..., RedisServer]]:
    """Factory for servers a test may kill, pause or configure; all stopped at teardown."""
    _require_binary()
    started: list[RedisServer] = []

    def start(**kwargs: object) -> RedisServer:
        server = RedisServer(**kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def make_tier() -> Iterator[Callable[..., RedisTier]]:
    """Factory for tiers with short timeouts; all closed at teardown."""
    tiers: list[RedisTier] = []

    def make(url: str, **overrides: object) -> RedisTier:
        options: dict[str, object] = dict(
            url=url, socket_timeout_s=1.0, connect_timeout_s=0.5, retry_interval_s=0.2
        )
        options.update(overrides)
        tier = RedisTier(RedisSettings(**options))
        tiers.append(tier)
        return tier

    yield make
    for tier in tiers:
        tier.close()
