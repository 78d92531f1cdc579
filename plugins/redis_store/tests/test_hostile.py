"""Issue 17: forged manifests, split values on a full server, parts that go missing.

Real redis-server on loopback; every loop bounded. Figures are printed (``pytest -s``).
"""

from __future__ import annotations

import os
import struct
import tracemalloc

from kvcore import chunk_format
from kvcore.testing.tier_contract import make_keys
from kvcore_redis.layout import MANIFEST_MAGIC, Manifest, Naming

MiB = 1024**2


def _forged_manifest(total: int, part_size: int = 4 * MiB - 64) -> bytes:
    parts = -(-total // part_size)
    return struct.pack("<4sHHIQQ4x", MANIFEST_MAGIC, 1, 0, parts, total, part_size)


def test_forged_manifest_allocates_nothing_before_its_parts_are_seen(
        redis_url, make_tier, figure) -> None:
    tier = make_tier(redis_url)
    client = tier.client()
    keys = make_keys(3, tenant="forged")
    claims = [4 * 1024 * MiB, 200 * MiB, 100 * MiB]  # over the bound; within it, parts absent
    for key, claim in zip(keys, claims):
        client.set(tier.naming.chunk(key), _forged_manifest(claim))
    # A real split chunk next to them still reads back.
    real = make_keys(1, tenant="real")[0]
    payload = os.urandom(3 * MiB)
    assert tier.put([(real, chunk_format.encode(real, payload))]) == [True]

    tracemalloc.start()
    try:
        values = tier.get(keys + [real])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    figure(f"forged manifests claiming {[c // MiB for c in claims]} MiB: peak "
          f"{peak / MiB:.1f} MiB allocated by the read (one real 3 MiB chunk read alongside)")
    assert values[:3] == [None, None, None]
    assert chunk_format.decode(real, values[3]) == payload
    assert peak < 2 * (3 * MiB + 64 * 1024)  # at most the one real chunk (and its receive copy)
    assert tier.contains(keys) == [False, False, False]  # forged manifests were removed
    assert tier.stats["corrupt_removed"] == 3


def test_full_server_never_leaves_a_manifest_without_its_parts(
        new_server, make_tier, figure) -> None:
    """Issue 17: with noeviction the manifest went in while its parts were refused; lookup
    promised 12 chunks and the load got 1, every round."""
    server = new_server(maxmemory="6mb", policy="noeviction")
    tier = make_tier(server.url)
    promised_not_loaded = 0
    stored_total = 0
    for round_ in range(3):
        keys = make_keys(12, tenant=f"full-{round_}")
        chunks = {k: chunk_format.encode(k, os.urandom(600_000)) for k in keys}
        results = tier.put(list(chunks.items()))  # one pipeline: later chunks hit OOM
        stored_total += sum(results)
        present = tier.contains(keys)
        values = tier.get(keys)
        promised_not_loaded += sum(1 for p, v in zip(present, values) if p and v is None)
        for key, ok, p, v in zip(keys, results, present, values):
            assert p == ok  # a chunk counts as present exactly when its put succeeded
            if ok:
                assert bytes(v) == b"".join(bytes(x) for x in chunks[key])
        # no part of a refused chunk is left behind either
        names = [Naming.part(tier.naming.chunk(k), 0) for k, ok in zip(keys, results) if not ok]
        assert not any(tier.client().exists(n) for n in names)
    figure(f"noeviction server, 3 rounds of 12 split chunks: {stored_total} stored, "
          f"{promised_not_loaded} promised by lookup but not loaded")
    assert promised_not_loaded == 0
    assert 0 < stored_total < 36  # the server really was full


def test_manifest_with_a_missing_part_is_corrupt_and_removed(redis_url, make_tier) -> None:
    tier = make_tier(redis_url)
    keys = make_keys(3, tenant="holes")
    data = {k: os.urandom(2 * MiB) for k in keys}
    assert tier.put([(k, chunk_format.encode(k, v)) for k, v in data.items()]) == [True] * 3
    client = tier.client()
    name0, name1 = tier.naming.chunk(keys[0]), tier.naming.chunk(keys[1])
    manifest = Manifest.decode(client.get(name0))
    assert manifest is not None and manifest.parts >= 2
    client.delete(Naming.part(name0, 1))  # evicted, expired or deleted by someone
    client.setrange(Naming.part(name1, 0), manifest.part_size, b"xx")  # a part grown
    for _ in range(2):  # the second round must not promise them again
        values = tier.get(keys)
        assert values[0] is None and values[1] is None
        assert chunk_format.decode(keys[2], values[2]) == data[keys[2]]
    assert tier.contains(keys) == [False, False, True]
    assert not client.exists(Naming.part(name0, 0))  # its surviving parts went with it
    assert tier.stats["corrupt_removed"] == 2


def test_value_over_the_bound_is_refused(redis_url, make_tier) -> None:
    tier = make_tier(redis_url, max_value_bytes="1MiB")
    big, small = make_keys(2, tenant="bound")
    assert tier.put([(big, chunk_format.encode(big, os.urandom(MiB + 1))),
                     (small, chunk_format.encode(small, os.urandom(900_000)))]) == [False, True]
    assert tier.contains([big, small]) == [False, True]
