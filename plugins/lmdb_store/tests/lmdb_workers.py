"""Helpers of the kvcore-lmdb tests, and the worker processes they start.

Run as ``python lmdb_workers.py crash|mixed PATH ID``. Every value is derived from its key, so any
process can check that what it reads back is byte-identical to what was written.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from kvcore import chunk_format
from kvcore.eviction.lru import LRUPolicy
from kvcore.keys import Namespace, chunk_keys
from kvcore_lmdb.settings import LmdbSettings
from kvcore_lmdb.tier import LmdbTier

INLINE_MAX = 16 * 1024
CRASH_BUDGET = 6 * 1024**2
MIXED_BUDGET = 3 * 1024**2


def keys_for(tag: str, n: int) -> list[bytes]:
    return chunk_keys(Namespace("lmdb-test", tenant=tag), list(range(2 * n)), 2)


def payload_for(key: bytes, small: int = 512, large: int = 400_000) -> bytes:
    """Deterministic payload of a key: some inline-sized, most file-sized."""
    rng = random.Random(key)
    return rng.randbytes(rng.randint(small, large))


def framed_for(key: bytes) -> bytes:
    return b"".join(bytes(p) for p in chunk_format.encode(key, payload_for(key), 2))


def open_tier(path: str | Path, budget: int) -> LmdbTier:
    return LmdbTier(LmdbSettings(path=path, size=budget, inline_max=INLINE_MAX), LRUPolicy)


def check_store(tier: LmdbTier) -> tuple[int, int]:
    """Read every chunk back; return (intact chunks, corrupt loads)."""
    good = bad = 0
    keys = list(tier.iter_keys())
    for key, value in zip(keys, tier.get(keys)):
        if value is None:
            continue
        if bytes(value) == framed_for(key):
            good += 1
        else:
            bad += 1
    return good, bad


def crash_writer(path: str, round_id: int) -> None:
    """Write, overwrite-race and delete without end, until killed."""
    tier = open_tier(path, CRASH_BUDGET)
    print("ready", flush=True)
    rng = random.Random(round_id)
    old = keys_for(f"crash-{round_id}-start", 64)
    for generation in range(1_000_000):
        keys = keys_for(f"crash-{round_id}-{generation}", 64)
        for i in range(0, len(keys), 4):
            batch = keys[i : i + 4]
            ok = tier.put([(k, chunk_format.encode(k, payload_for(k), 2)) for k in batch])
            print(f"put {sum(ok)}", flush=True)
            if rng.random() < 0.3:
                tier.delete(rng.sample(old, 4))
            if rng.random() < 0.3:
                tier.get(rng.sample(old, 4))
        old = keys


def mixed_worker(path: str, worker_id: int) -> None:
    """Write a shared key set (overlapping with the other workers) and verify every read."""
    tier = open_tier(path, MIXED_BUDGET)
    keys = keys_for("mixed", 48)
    rng = random.Random(worker_id)
    order = keys[:]
    rng.shuffle(order)
    bad = hits = 0
    for i in range(0, len(order), 3):
        batch = order[i : i + 3]
        tier.put([(k, chunk_format.encode(k, payload_for(k, large=200_000), 2)) for k in batch])
        probe = rng.sample(keys, 6)
        for key, value in zip(probe, tier.get(probe)):
            if value is None:
                continue
            hits += 1
            expect = b"".join(bytes(p) for p in chunk_format.encode(
                key, payload_for(key, large=200_000), 2))
            bad += bytes(value) != expect
    tier.close()
    print(f"hits {hits} bad {bad}", flush=True)
    sys.exit(1 if bad else 0)


STEADY_BATCHES = 150


def steady_writer(path: str, worker_id: int) -> None:
    """Store STEADY_BATCHES batches of 2 chunks (a budget that never evicts), reading some
    back; print each batch's outcome. Waits for ``PATH.go`` before each batch after the tenth
    so the test can pull files away while writers run."""
    tier = LmdbTier(LmdbSettings(path=path, size=1024**3, inline_max=INLINE_MAX, check_s=0.05),
                    LRUPolicy)
    keys = keys_for(f"steady-{worker_id}", 2 * STEADY_BATCHES)
    bad = 0
    for b in range(STEADY_BATCHES):
        batch = keys[2 * b: 2 * b + 2]
        ok = tier.put([(k, chunk_format.encode(k, payload_for(k, 512, 40_000), 2))
                       for k in batch])
        print(f"batch {b} {int(ok[0])}{int(ok[1])}", flush=True)
        for key, value in zip(batch, tier.get(batch)):
            if value is not None and bytes(value) != b"".join(bytes(p) for p in chunk_format.encode(
                    key, payload_for(key, 512, 40_000), 2)):
                bad += 1
    tier.close()
    print(f"done bad {bad}", flush=True)
    sys.exit(1 if bad else 0)


def engine_worker(path: str, load: int) -> None:
    """A real engine built from KVCORE_* settings: store 8 chunks, or look them up and load."""
    from kvcore.engine import open_engine

    keys = keys_for("engine", 8)
    payloads = [payload_for(k, 70_000, 70_000) for k in keys]
    with open_engine() as engine:
        if not load:
            assert engine.store_buffers(keys, payloads).wait(30) == 8
            assert engine.flush(30)
            print("stored", flush=True)
            return
        found = engine.lookup(keys)
        with engine.acquire(keys) as lease:
            same = [bytes(v) for v in lease.views] == payloads
        print(f"found {found.chunks} lmdb {found.by_tier.get('lmdb', 0)} same {same}", flush=True)


if __name__ == "__main__":
    mode, store_path, ident = sys.argv[1], sys.argv[2], int(sys.argv[3])
    {"crash": crash_writer, "mixed": mixed_worker, "engine": engine_worker,
     "steady": steady_writer}[mode](
        store_path, ident)
