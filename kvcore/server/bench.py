"""``kvcore bench server``: the shared memory tier of ``kvcore server`` against the in-process
CPU tier, in the same run.

- store and load GB/s through each engine (chunks of ``--chunk-mib``, ``--chunks`` per call;
  a load copies the chunks out of the views the tier hands over), and their ratio (goal 0.9);
- lookup latency of a 128K-token prompt (512 chunks of 256 tokens) held in the server;
- host memory for ``--engines`` engine processes that each store the same prefix set: bytes
  held in process (one copy per engine) against in the server (one copy).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kvcore.config import load_settings
from kvcore.engine import CacheEngine
from kvcore.keys import Namespace, chunk_keys
from kvcore.testing.server import ServerProcess


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chunk-mib", type=float, default=4.0, help="bytes of one chunk (MiB)")
    parser.add_argument("--chunks", type=int, default=16, help="chunks per store or load")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--engines", type=int, default=4, help="engine processes sharing")


def _median_s(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up: first touch of the pages
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def _throughput(engine: CacheEngine, arrays: list[np.ndarray], repeat: int
                ) -> dict[str, float]:
    """Store then load GB/s of ``arrays`` through ``engine``'s memory tier."""
    values = [a.data for a in arrays]
    total = sum(v.nbytes for v in values)
    rounds = iter(range(1 << 30))
    out = np.empty(total, dtype=np.uint8)

    def store() -> None:
        keys = chunk_keys(Namespace("bench-server"), [next(rounds)] * len(values), 1)
        engine.store_buffers(keys, values).wait(60)
        engine.memory.delete(keys)

    keys = chunk_keys(Namespace("bench-server-load"), list(range(len(values))), 1)
    engine.store_buffers(keys, values).wait(60)

    def load() -> None:
        views = engine.memory.acquire(keys)
        offset = 0
        for view in views:
            assert view is not None
            part = np.frombuffer(view, dtype=np.uint8)
            out[offset : offset + part.nbytes] = part
            offset += part.nbytes
        engine.memory.release(views)

    return {"store_gbps": round(total / _median_s(store, repeat) / 1e9, 2),
            "load_gbps": round(total / _median_s(load, repeat) / 1e9, 2)}


SHARER = textwrap.dedent('''
    import json, sys
    import numpy as np
    from kvcore.config import load_settings
    from kvcore.engine import CacheEngine
    from kvcore.keys import Namespace
    chunks, nbytes = int(sys.argv[1]), int(sys.argv[2])
    engine = CacheEngine(load_settings(chunk_size=4, cpu_size=(chunks + 4) * nbytes))
    keys = engine.keys_for(Namespace("bench-shared"), list(range(4 * chunks)))
    values = [np.full(nbytes, i % 251, dtype=np.uint8) for i in range(chunks)]
    engine.store_buffers(keys, values).wait(60)
    print(json.dumps({"held": engine.memory.usage().used_bytes}), flush=True)
    engine.close()
''')


def _sharing(engines: int, chunks: int, nbytes: int, env: dict[str, str]) -> int:
    """Bytes each of ``engines`` processes reports its memory tier holds after storing the
    same prefix set, summed."""
    total = 0
    for _ in range(engines):
        run = subprocess.run([sys.executable, "-c", SHARER, str(chunks), str(nbytes)],
                             env=env, capture_output=True, text=True, timeout=300)
        if run.returncode != 0:
            raise RuntimeError(run.stderr[-2000:])
        total += json.loads(run.stdout.strip().splitlines()[-1])["held"]
    return total


def _server_used(url: str) -> int:
    from kvcore.server.client import ServerTier
    from kvcore.server.settings import ServerSettings

    tier = ServerTier(ServerSettings(url=url))
    try:
        return tier.usage().used_bytes
    finally:
        tier.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    nbytes = int(args.chunk_mib * (1 << 20))
    rng = np.random.default_rng(0)
    values = [rng.integers(0, 256, nbytes, dtype=np.uint8) for _ in range(args.chunks)]
    budget = (4 * args.chunks + 8) * nbytes
    figures: dict[str, Any] = {"chunk_bytes": nbytes, "chunks_per_call": args.chunks}
    with tempfile.TemporaryDirectory(prefix="kvcore-bench-server-") as tmp:
        server = ServerProcess(Path(tmp), budget=max(budget, 600 * (1 << 20)), lease_s=30.0,
                               shm_dir=Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
        server.start()
        try:
            local = CacheEngine(load_settings(chunk_size=256, cpu_size=budget))
            os.environ.update(server.client_env())
            try:
                shared = CacheEngine(load_settings(chunk_size=256, cpu_size=budget))
            finally:
                for name in server.client_env():
                    os.environ.pop(name, None)
            try:
                in_process = _throughput(local, values, args.repeat)
                through = _throughput(shared, values, args.repeat)
                figures["in_process"], figures["server"] = in_process, through
                figures["ratio"] = {
                    "store": round(through["store_gbps"] / in_process["store_gbps"], 3),
                    "load": round(through["load_gbps"] / in_process["load_gbps"], 3)}
                prompt = list(range(128 * 1024))
                keys = shared.keys_for(Namespace("bench-lookup"), prompt)
                small = [memoryview(bytes(4096))] * len(keys)
                shared.store_buffers(keys, small).wait(60)
                local.store_buffers(keys, small).wait(60)
                figures["lookup_128k_ms"] = {
                    "server": round(1e3 * _median_s(lambda: shared.lookup(keys), args.repeat), 3),
                    "in_process": round(1e3 * _median_s(lambda: local.lookup(keys),
                                                        args.repeat), 3)}
                assert shared.lookup(keys).tokens == len(prompt)
            finally:
                local.close()
                shared.close()
            share_chunks, share_bytes = 16, 1 << 20
            base_env = {k: v for k, v in os.environ.items() if not k.startswith("KVCORE_")}
            alone = _sharing(args.engines, share_chunks, share_bytes, base_env)
            before = _server_used(server.url)
            attached = _sharing(args.engines, share_chunks, share_bytes,
                                {**base_env, **server.client_env()})
            added = _server_used(server.url) - before
            prefix = share_chunks * share_bytes
            figures["memory"] = {
                "engines": args.engines, "prefix_bytes": prefix,
                "in_process_bytes": alone, "in_process_copies": round(alone / prefix, 2),
                "server_bytes": added, "server_copies": round(added / prefix, 2),
                "engines_saw_bytes": attached}
        finally:
            server.stop()  # SIGTERM: the server removes its shared memory
    return figures
