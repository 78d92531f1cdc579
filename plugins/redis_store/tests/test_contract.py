"""The tier contract on a real server, over a unix socket, and on a real 3-node cluster."""

from __future__ import annotations

import os

import pytest

from kvcore import chunk_format
from kvcore.testing.tier_contract import LowerTierContract, make_keys
from kvcore_redis import RedisTier
from kvcore_redis.server import RedisClusterServers, RedisServer


class _RedisContract(LowerTierContract):
    usage_staleness_s = 1.1  # RedisTier.usage() reads INFO memory at most once a second


class TestRedisServer(_RedisContract):
    @pytest.fixture
    def tier(self, redis_url: str, make_tier) -> RedisTier:
        return make_tier(redis_url)


class TestRedisServerSplitValues(_RedisContract):
    """Every value above 64 KiB is stored as parts plus a manifest."""

    chunk_bytes = 200_000

    @pytest.fixture
    def tier(self, redis_url: str, make_tier) -> RedisTier:
        return make_tier(redis_url, part_size=64 * 1024)


class TestRedisCluster(_RedisContract):
    chunk_bytes = 100_000

    @pytest.fixture
    def tier(self, cluster_url: str, make_tier) -> RedisTier:
        return make_tier(cluster_url, part_size=64 * 1024)


def test_unix_socket_round_trip(
    redis_server: RedisServer, redis_url: str, make_tier
) -> None:
    tier = make_tier(f"unix://{redis_server.socket}?db=2")
    keys = make_keys(3, tenant="unix")
    payloads = [os.urandom(5000) for _ in keys]
    assert tier.put([(k, chunk_format.encode(k, p)) for k, p in zip(keys, payloads)]) == [True] * 3
    assert [bytes(chunk_format.decode(k, v)) for k, v in zip(keys, tier.get(keys))] == payloads
    assert redis_server.client().dbsize() == 0  # db 2, not db 0
    assert tier.delete(keys) == 3


def test_cluster_spreads_chunks_and_keeps_parts_with_manifest(
    redis_cluster: RedisClusterServers, cluster_url: str, make_tier
) -> None:
    tier = make_tier(cluster_url, part_size=64 * 1024)
    keys = make_keys(24, tenant="spread")
    payloads = [os.urandom(150_000) for _ in keys]
    assert all(tier.put([(k, chunk_format.encode(k, p)) for k, p in zip(keys, payloads)]))
    values = tier.get(keys)
    assert [bytes(chunk_format.decode(k, v)) for k, v in zip(keys, values)] == payloads
    for node in redis_cluster.nodes:
        client = node.client()
        names = list(client.scan_iter(match=b"kvcore:{*", count=1000))
        assert names, "every node holds some chunks"
        chunks = {n.split(b"}")[0] for n in names}
        for chunk in chunks:  # manifest and its 3 parts on the same node
            assert sum(1 for n in names if n.startswith(chunk + b"}")) == 4
    assert sorted(tier.iter_keys()) == sorted(keys)
    assert tier.delete(keys) == len(keys)
    assert sum(n.client().dbsize() for n in redis_cluster.nodes) == 0
