"""``kvcore bench disk``: store and load GB/s of the lmdb tier against raw pwrite/pread.

Both sides move the same framed bytes (header + payload, as the engine hands them to a lower
tier) in the same run, batch by batch in alternation, with the same durability: with ``--fsync``
the tier fsyncs each batch's payload files and the raw baseline fsyncs its file after each
batch. Reads come from the page cache on both sides (the bytes were just written), so the ratio
measures the tier's own overhead. Each side's best round is reported.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from kvcore import chunk_format
from kvcore.eviction.lru import LRUPolicy
from kvcore.keys import Namespace, chunk_keys
from kvcore_lmdb.settings import LmdbSettings
from kvcore_lmdb.tier import LmdbTier


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chunk-mib", type=float, default=16.0, help="payload MiB per chunk")
    parser.add_argument("--chunks", type=int, default=32, help="chunks per round")
    parser.add_argument("--batch", type=int, default=8, help="chunks per put (engine batch)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the best is reported")
    parser.add_argument("--dir", default=None, help="directory to test (default: a temp dir)")
    parser.add_argument("--fsync", action="store_true", help="fsync both sides")


def run(args: argparse.Namespace) -> dict:
    base = Path(tempfile.mkdtemp(prefix="kvcore-bench-disk-", dir=args.dir))
    try:
        return _measure(args, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _measure(args: argparse.Namespace, base: Path) -> dict:
    nbytes = int(args.chunk_mib * 1024**2)
    payload = os.urandom(nbytes)
    keys = chunk_keys(Namespace("bench-disk"), list(range(args.chunks * 2)), 2)
    framed = [(k, chunk_format.encode(k, payload, 2)) for k in keys]
    blobs = [b"".join(bytes(p) for p in parts) for _, parts in framed]  # raw side, untimed
    batches = [range(i, min(i + args.batch, len(framed)))
               for i in range(0, len(framed), args.batch)]
    total = len(blobs) * len(blobs[0])
    best = {"tier_write": 0.0, "tier_read": 0.0, "raw_write": 0.0, "raw_read": 0.0}
    for r in range(args.rounds):
        settings = LmdbSettings(path=base / f"store{r}", size=4 * total, fsync=args.fsync)
        tier = LmdbTier(settings, LRUPolicy)
        fd = os.open(base / f"raw{r}", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        spent = dict.fromkeys(best, 0.0)
        # batch by batch, the two sides alternate (and swap who goes first each round), so
        # whatever else the machine does falls on both alike
        for phase in ("write", "read"):
            for batch in batches:
                sides = ("raw", "tier") if r % 2 == 0 else ("tier", "raw")
                for side in sides:
                    started = time.perf_counter()
                    if side == "raw":
                        _raw_batch(fd, blobs, batch, phase, args.fsync)
                    else:
                        _tier_batch(tier, framed, batch, phase)
                    spent[f"{side}_{phase}"] += time.perf_counter() - started
        os.close(fd)
        tier.close()
        for name, seconds in spent.items():
            best[name] = max(best[name], total / seconds)
        shutil.rmtree(base / f"store{r}", ignore_errors=True)
        (base / f"raw{r}").unlink(missing_ok=True)
    gb = 1e9
    return {
        "compared": "lmdb tier put/get of framed chunks vs raw os.pwrite/os.pread, same bytes",
        "machine": f"{platform.node()} {platform.machine()} cpus={os.cpu_count()}",
        "chunk_bytes": nbytes,
        "chunks": args.chunks,
        "batch": args.batch,
        "rounds": args.rounds,
        "fsync": bool(args.fsync),
        "tier_write_gbps": round(best["tier_write"] / gb, 3),
        "raw_write_gbps": round(best["raw_write"] / gb, 3),
        "tier_read_gbps": round(best["tier_read"] / gb, 3),
        "raw_read_gbps": round(best["raw_read"] / gb, 3),
        "ratio_write": round(best["tier_write"] / best["raw_write"], 3),
        "ratio_read": round(best["tier_read"] / best["raw_read"], 3),
    }


def _raw_batch(fd: int, blobs: list[bytes], batch: range, phase: str, fsync: bool) -> None:
    size = len(blobs[0])
    if phase == "write":
        for i in batch:
            os.pwrite(fd, blobs[i], i * size)
        if fsync:
            os.fsync(fd)
        return
    values = [os.pread(fd, size, i * size) for i in batch]  # held at once, as the tier's get
    assert all(len(v) == size for v in values)


def _tier_batch(tier: LmdbTier, framed: list, batch: range, phase: str) -> None:
    if phase == "write":
        assert all(tier.put([framed[i] for i in batch]))
        return
    values = tier.get([framed[i][0] for i in batch])
    assert all(v is not None for v in values)
