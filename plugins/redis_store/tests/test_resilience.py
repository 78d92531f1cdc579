"""A server that is down, slow, full or refuses the password: misses, one log line, no crash."""

from __future__ import annotations

import logging
import os
import time

import pytest

from kvcore import chunk_format
from kvcore.config import ConfigError, load_settings
from kvcore.engine import CacheEngine
from kvcore.eviction.lru import LRUPolicy
from kvcore.testing.tier_contract import make_keys
from kvcore.tiers.cpu import CpuTier
from kvcore_redis import RedisSettings, RedisTier


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "kvcore.redis" and r.levelno == logging.WARNING and text in r.getMessage()]


def _engine(tier: RedisTier) -> CacheEngine:
    settings = load_settings(chunk_size=4, tiers=["cpu", "redis"], tier_timeout_s=3.0)
    return CacheEngine(settings, tiers=[CpuTier(64 * 1024**2, LRUPolicy()), tier])


def _wait_for(predicate, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_server_killed_and_restarted_mid_run(new_server, make_tier, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="kvcore.redis")
    server = new_server()
    tier = make_tier(server.url)
    engine = _engine(tier)
    try:
        before = make_keys(4, tenant="before")
        data = {k: os.urandom(3000) for k in make_keys(4, tenant="before")
                + make_keys(4, tenant="during") + make_keys(4, tenant="after")}
        assert engine.store_buffers(before, [data[k] for k in before]).wait(10) == 4
        assert engine.flush(10) and all(tier.contains(before))

        server.kill()
        engine.clear(tier="cpu")
        assert engine.lookup(before).chunks == 0  # the shared tier is gone: misses
        during = make_keys(4, tenant="during")
        assert engine.store_buffers(during, [data[k] for k in during]).wait(10) == 4
        assert engine.flush(10)  # write-behind to the dead server fails fast
        for _ in range(5):  # the engine keeps working from memory
            assert engine.lookup(before + during).chunks == 0
            assert engine.lookup(during).chunks == 4
            with engine.acquire(during) as lease:
                assert [bytes(v) for v in lease.views] == [data[k] for k in during]
        assert len(_warnings(caplog, "failed")) == 1  # one line per outage, not per call

        server.start()  # same port, empty (no persistence); the same tier object reconnects
        after = make_keys(4, tenant="after")

        def shared_again() -> bool:
            engine.store_buffers(after, [data[k] for k in after]).wait(10)
            engine.flush(10)
            engine.clear(tier="cpu")
            return engine.lookup(after, prefetch=False).chunks == 4

        assert _wait_for(shared_again)
        with engine.acquire(after) as lease:
            assert [bytes(v) for v in lease.views] == [data[k] for k in after]
        assert _warnings(caplog, "answers again")
    finally:
        engine.close()


def test_paused_server_is_a_miss_not_a_hang(new_server, make_tier, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="kvcore.redis")
    server = new_server()
    tier = make_tier(server.url, socket_timeout_s=0.3, connect_timeout_s=0.3)
    keys = make_keys(2, tenant="paused")
    framed = [(k, chunk_format.encode(k, os.urandom(1000))) for k in keys]
    assert tier.put(framed) == [True, True]
    server.pause()
    try:
        assert tier.get(keys) == [None, None]
        assert tier.contains(keys) == [False, False]
        assert tier.put(framed) == [False, False]
    finally:
        server.resume()
    assert _wait_for(lambda: tier.contains(keys) == [True, True])
    assert len(_warnings(caplog, "failed")) == 1


def test_server_down_at_start_then_up(new_server, make_tier, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="kvcore.redis")
    server = new_server()
    server.kill()
    tier = make_tier(server.url)  # constructing does not fail: the server may come later
    keys = make_keys(2, tenant="late")
    assert tier.contains(keys) == [False, False]
    assert tier.put([(k, chunk_format.encode(k, b"x" * 100)) for k in keys]) == [False, False]
    assert tier.usage().used_bytes == 0
    server.start()
    assert _wait_for(lambda: tier.put([(k, chunk_format.encode(k, b"x")) for k in keys])
                     == [True, True])
    assert len(_warnings(caplog, "failed")) == 1


def test_full_server_refuses_puts_once_logged(new_server, make_tier, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="kvcore.redis")
    server = new_server(maxmemory="2mb", policy="noeviction")
    tier = make_tier(server.url)
    keys = make_keys(12, tenant="full")
    results = [tier.put([(k, chunk_format.encode(k, os.urandom(400_000)))])[0] for k in keys]
    assert results[0] is True and results[-1] is False
    assert len(_warnings(caplog, "full")) == 1
    stored = [k for k, ok in zip(keys, results) if ok]
    assert all(v is not None for v in tier.get(stored))  # what was stored still reads back


def test_wrong_password_is_a_clear_config_error(new_server, make_tier, monkeypatch) -> None:
    server = new_server(password="right-horse-7")
    wrong = f"redis://:wrong-battery-9@127.0.0.1:{server.port}/0"
    with pytest.raises(ConfigError) as info:
        make_tier(wrong)
    message = str(info.value)
    assert "KVCORE_REDIS_URL" in message and "wrong-battery-9" not in message
    assert "***" in message
    with pytest.raises(ConfigError, match="KVCORE_REDIS_URL"):
        make_tier(f"redis://127.0.0.1:{server.port}/0")  # no password at all

    monkeypatch.setenv("KVCORE_REDIS_URL", wrong)  # through the plugin, as an engine builds it
    with pytest.raises(ConfigError) as info:
        CacheEngine(load_settings(tiers=["cpu", "redis"]))
    assert "wrong-battery-9" not in str(info.value)

    tier = make_tier(server.url)
    key = make_keys(1, tenant="auth")[0]
    assert tier.put([(key, chunk_format.encode(key, b"ok"))]) == [True]


def test_acl_user_from_settings_never_printed(new_server, make_tier) -> None:
    server = new_server()
    # the rule docs/redis.md recommends
    server.client().execute_command(
        "ACL", "SETUSER", "kv", "on", ">acl-pass-3", "~kvcore:*", "+@read", "+@write",
        "+@keyspace", "+@connection", "+info", "+dbsize")
    settings = RedisSettings(url=f"redis://127.0.0.1:{server.port}/0", username="kv",
                             password="acl-pass-3")
    assert "acl-pass-3" not in repr(settings) and "acl-pass-3" not in str(settings.model_dump())
    tier = RedisTier(settings)
    try:
        key = make_keys(1, tenant="acl")[0]
        big = make_keys(1, tenant="acl-big")[0]
        assert tier.put([(key, chunk_format.encode(key, b"acl"))]) == [True]
        assert tier.put([(big, chunk_format.encode(big, os.urandom(5 * 1024**2)))]) == [True]
        assert tier.get([key])[0] is not None and tier.contains([big]) == [True]
        assert sorted(tier.iter_keys()) == sorted([key, big])
        assert tier.usage().used_bytes > 0
        assert tier.delete([key, big]) == 2
    finally:
        tier.close()


def test_cluster_unreachable_at_start_is_misses(make_tier, caplog) -> None:
    from kvcore_redis.server import free_port

    caplog.set_level(logging.WARNING, logger="kvcore.redis")
    tier = make_tier(f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{free_port()}")
    keys = make_keys(2, tenant="no-cluster")
    assert tier.contains(keys) == [False, False]
    assert tier.get(keys) == [None, None]
    assert tier.put([(k, chunk_format.encode(k, b"x")) for k in keys]) == [False, False]
    assert list(tier.iter_keys()) == []
    assert len(_warnings(caplog, "failed")) == 1


def test_cluster_node_killed_and_restarted(make_tier, caplog) -> None:
    from kvcore_redis.server import RedisClusterServers

    caplog.set_level(logging.WARNING, logger="kvcore.redis")
    cluster = RedisClusterServers(3)
    try:
        tier = make_tier(cluster.url)
        keys = make_keys(24, tenant="node-down")
        framed = [(k, chunk_format.encode(k, os.urandom(2000))) for k in keys]
        assert all(tier.put(framed))
        cluster.nodes[1].kill()
        for _ in range(3):  # the other nodes keep answering; the dead node's chunks are misses
            found = tier.contains(keys)
            assert 0 < sum(found) < len(keys)
            assert [v is not None for v in tier.get(keys)] == found
        assert tier.usage().used_bytes > 0  # what the live nodes hold
        dead = [k for k, hit in zip(keys, found) if not hit]
        live = [k for k, hit in zip(keys, found) if hit]
        assert tier.delete(dead + live[:1]) == 1
        assert len(_warnings(caplog, "failed")) == 1
        cluster.nodes[1].start()  # rejoins with its slots (nodes.conf kept), empty
        assert _wait_for(lambda: all(tier.put(framed)))
        assert tier.contains(keys) == [True] * len(keys)
    finally:
        cluster.stop()
