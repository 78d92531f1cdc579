"""Split values, values cut short, key names, TTL."""

from __future__ import annotations

import os

from kvcore import chunk_format
from kvcore.config import load_settings
from kvcore.engine import CacheEngine
from kvcore.eviction.lru import LRUPolicy
from kvcore.testing.tier_contract import make_keys
from kvcore.tiers.cpu import CpuTier
from kvcore_redis.layout import Manifest, Naming, allocation, piece_size, split

PART = 64 * 1024


def test_split_cuts_exactly_without_copying() -> None:
    head, payload = os.urandom(56), os.urandom(3 * PART + 10)
    pieces = list(split([head, memoryview(payload)], PART))
    assert [sum(v.nbytes for v in p) for p in pieces] == [PART, PART, PART, 66]
    assert b"".join(b"".join(p) for p in pieces) == head + payload
    assert all(isinstance(v, memoryview) for p in pieces for v in p)
    assert len(pieces[0]) == 2  # the header and the start of the payload, as two views


def test_pieces_fill_allocations_instead_of_spilling_over() -> None:
    mib = 1024**2
    assert allocation(4 * mib + 72) == 5 * mib and allocation(4 * mib) == 4 * mib
    assert piece_size(4 * mib + 56, 4 * mib) == 4 * mib - 64  # one full piece + a small tail
    assert piece_size(32 * mib + 56, 4 * mib) == 4 * mib - 64
    assert piece_size(3 * mib - 16, 4 * mib) is None  # fills a size class: stored whole
    assert piece_size(10_000, 4 * mib) is None


def test_manifest_round_trip_and_rejects_other_values() -> None:
    manifest = Manifest(3, 2 * PART + 1, PART)
    assert Manifest.decode(manifest.encode()) == manifest
    assert Manifest.decode(b"KVRM" + b"\0" * 28) is None
    assert Manifest.decode(b"KVC1" + b"\0" * 28) is None
    assert Manifest.decode(Manifest(1, 1 << 40, 1 << 40).encode()) is None  # absurd sizes


def test_key_names_carry_the_namespace() -> None:
    naming = Naming("kvcore:")
    a, b = make_keys(1, tenant="a")[0], make_keys(1, tenant="b")[0]
    assert naming.chunk(a) != naming.chunk(b)  # tenants differ in the namespace digest
    assert naming.chunk(a) == b"kvcore:{" + a.hex().encode() + b"}"
    assert naming.key_of(naming.chunk(a)) == a
    assert naming.key_of(Naming.part(naming.chunk(a), 0)) is None


def test_values_cut_short_are_misses(redis_server, redis_url, make_tier) -> None:
    tier = make_tier(redis_url, part_size=PART)
    client = redis_server.client()
    small, big, gone = make_keys(3, tenant="short")
    payloads = {small: os.urandom(1000), big: os.urandom(3 * PART), gone: os.urandom(3 * PART)}
    assert all(tier.put([(k, chunk_format.encode(k, p)) for k, p in payloads.items()]))
    name = tier.naming.chunk
    client.set(name(small), client.get(name(small))[:-10])  # a whole value cut short
    part = Naming.part(name(big), 1)
    client.set(part, client.get(part)[:-1])  # one part cut short
    client.delete(Naming.part(name(gone), 2))  # one part evicted
    values = tier.get([small, big, gone])
    assert values[1] is None and values[2] is None
    assert chunk_format.decode(small, values[0]) is None

    settings = load_settings(chunk_size=4, tiers=["cpu", "redis"])
    engine = CacheEngine(settings, tiers=[CpuTier(64 * 1024**2, LRUPolicy()), tier])
    try:
        with engine.acquire([small]) as lease:
            assert len(lease) == 0
    finally:
        engine.close()


def test_ttl_applies_to_values_and_parts(redis_server, redis_url, make_tier) -> None:
    tier = make_tier(redis_url, part_size=PART, ttl_s=60)
    key = make_keys(1, tenant="ttl")[0]
    assert tier.put([(key, chunk_format.encode(key, os.urandom(2 * PART)))]) == [True]
    client = redis_server.client()
    names = [tier.naming.chunk(key)] + [Naming.part(tier.naming.chunk(key), j) for j in range(3)]
    assert all(0 < client.pttl(n) <= 60_000 for n in names)
    client.pexpire(names[0], 5_000)
    assert tier.get([key])[0] is not None
    assert client.pttl(names[0]) > 5_000  # a hit renews the TTL


def test_delete_removes_parts(redis_server, redis_url, make_tier) -> None:
    tier = make_tier(redis_url, part_size=PART)
    keys = make_keys(2, tenant="del-parts")
    assert all(tier.put([(k, chunk_format.encode(k, os.urandom(2 * PART))) for k in keys]))
    assert redis_server.client().dbsize() == 8  # 3 parts + manifest, twice
    assert tier.delete(keys) == 2
    assert redis_server.client().dbsize() == 0
