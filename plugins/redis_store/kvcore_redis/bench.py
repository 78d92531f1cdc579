"""``kvcore bench redis``: store and load GB/s through the tier vs a plain redis-py pipeline.

Both sides move the same framed values (header + payload, as the engine hands them to the tier)
in batches of ``--batch`` chunks, one pipeline per batch, against the same server in the same
run; each figure is the best of ``--repeat`` rounds, and the rounds alternate which side goes
first.
Without ``--url`` the bench starts its own ``redis-server`` on loopback.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from typing import Any

from kvcore import chunk_format
from kvcore.keys import Namespace, chunk_keys
from kvcore_redis.settings import MiB, RedisSettings
from kvcore_redis.tier import RedisTier
from kvcore_redis.urls import redact


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="server to use (default: start a redis-server here)")
    parser.add_argument("--chunk-mib", type=float, default=4.0, help="payload per chunk, MiB")
    parser.add_argument("--chunks", type=int, default=64, help="chunks per round")
    parser.add_argument("--batch", type=int, default=16, help="chunks per tier call / pipeline")
    parser.add_argument("--repeat", type=int, default=5, help="rounds; the best one counts")
    parser.add_argument("--part-mib", type=float, default=4.0,
                        help="KVCORE_REDIS_PART_SIZE of the tier, MiB")


def _best_gbps(total: int, rounds: list[float]) -> float:
    return round(total / min(rounds) / 1e9, 3)


def _timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kvcore_redis.server import RedisServer

    chunk = int(args.chunk_mib * MiB)
    server = None
    url = args.url
    if not url:
        need = 2 * args.chunks * (chunk + 4096) + 256 * MiB
        server = RedisServer(maxmemory=str(need), policy="allkeys-lru")
        url = server.url
    tier = RedisTier(RedisSettings(url=url, part_size=int(args.part_mib * MiB),
                                   socket_timeout_s=30.0))
    try:
        return _measure(args, tier, url, chunk, server is not None)
    finally:
        tier.close()
        if server is not None:
            server.stop()


def _measure(args: argparse.Namespace, tier: RedisTier, url: str, chunk: int,
             own_server: bool) -> dict[str, Any]:
    plain = tier.client()  # the same connection settings, used as plain redis-py
    keys = chunk_keys(Namespace("bench-redis"), list(range(args.chunks)), 1)
    framed = [(k, chunk_format.encode(k, os.urandom(chunk), 1)) for k in keys]
    joined = [(b"plain:" + k.hex().encode(), b"".join(bytes(p) for p in parts))
              for k, parts in framed]
    total = sum(len(v) for _, v in joined)
    batches = [range(i, min(i + args.batch, len(keys))) for i in range(0, len(keys), args.batch)]

    def plain_write() -> None:
        for batch in batches:
            pipe = plain.pipeline(transaction=False)
            for i in batch:
                pipe.set(*joined[i])
            pipe.execute()

    def plain_read() -> None:
        for batch in batches:
            pipe = plain.pipeline(transaction=False)
            for i in batch:
                pipe.get(joined[i][0])
            assert all(v is not None for v in pipe.execute())

    def tier_write() -> None:
        for batch in batches:
            assert all(tier.put([framed[i] for i in batch]))

    def tier_read() -> None:
        for batch in batches:
            assert all(v is not None for v in tier.get([keys[i] for i in batch]))

    def clean() -> None:  # only the bench's own keys: --url may be a server in use
        for batch in batches:
            pipe = plain.pipeline(transaction=False)
            for i in batch:
                pipe.unlink(joined[i][0])
            pipe.execute()
        tier.delete(keys)

    rounds: dict[str, list[float]] = {n: [] for n in ("pw", "pr", "kw", "kr")}
    try:
        sides = [(plain_write, plain_read, "pw", "pr"), (tier_write, tier_read, "kw", "kr")]
        for r in range(args.repeat):
            for write, read, w, rd in (sides if r % 2 == 0 else sides[::-1]):  # ABBA order
                clean()
                rounds[w].append(_timed(write))
                rounds[rd].append(_timed(read))
        check = chunk_format.decode(keys[0], tier.get(keys[:1])[0])
        assert check is not None and bytes(check) == bytes(framed[0][1][1])
    finally:
        clean()
    info = plain.info("server")
    figures: dict[str, Any] = {
        "compared": "kvcore RedisTier.put/get vs plain redis-py pipeline SET/GET, same values",
        "plain_write_gbps": _best_gbps(total, rounds["pw"]),
        "kvcore_write_gbps": _best_gbps(total, rounds["kw"]),
        "plain_read_gbps": _best_gbps(total, rounds["pr"]),
        "kvcore_read_gbps": _best_gbps(total, rounds["kr"]),
    }
    figures["ratio_write"] = round(figures["kvcore_write_gbps"] / figures["plain_write_gbps"], 3)
    figures["ratio_read"] = round(figures["kvcore_read_gbps"] / figures["plain_read_gbps"], 3)
    figures.update(
        chunk_bytes=chunk,
        chunks=args.chunks,
        batch=args.batch,
        part_bytes=tier.settings.part_size,
        repeat=args.repeat,
        server=f"redis {info.get('redis_version')} "
               f"({'started by the bench' if own_server else redact(url)})",
        hiredis=_has_hiredis(),
        machine=f"{platform.machine()} {os.cpu_count()} cpus, {platform.platform()}",
    )
    return figures


def _has_hiredis() -> bool:
    try:
        import hiredis  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__)
    add_arguments(cli)
    for name, value in run(cli.parse_args()).items():
        print(f"{name:<20} {value}")
