"""Engine overhead: lookup time for a 128K-token prompt with 1M chunks indexed, and metadata bytes
per indexed chunk (CPU tier entry + eviction-policy state), for each built-in policy.

Baseline in the same run: the same lookup on an engine with an empty index, so the ratio shows
whether lookup cost stays flat as the index grows.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
import tracemalloc

import numpy as np

from kvcore.config import load_settings
from kvcore.engine import CacheEngine
from kvcore.keys import Namespace, chunk_keys
from kvcore.tiers.cpu import CpuTier


def fill_index(engine: CacheEngine, n: int) -> None:
    """Index ``n`` one-byte chunks directly through the CPU tier (reserve + commit)."""
    cpu: CpuTier = engine.memory
    prefix = Namespace("filler").digest
    for i in range(n):
        key = prefix + i.to_bytes(16, "little")
        if cpu.reserve(key, 1, None) is not None:
            cpu.commit(key)


def metadata_bytes_per_chunk(policy: str, n: int) -> float:
    """Python heap bytes per indexed chunk (key, tier entry, policy state, 1-byte payload)."""
    engine = CacheEngine(load_settings(eviction=policy, cpu_size=1 << 40))
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    fill_index(engine, n)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    engine.close()
    return (after - before) / n


def time_lookup(engine: CacheEngine, tokens: np.ndarray, repeat: int) -> tuple[float, float]:
    ns = Namespace("bench-model")
    keys = chunk_keys(ns, tokens, engine.chunk_size)
    best_keys = best_lookup = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        keys = chunk_keys(ns, tokens, engine.chunk_size)
        mid = time.perf_counter()
        engine.lookup(keys, prefetch=False)
        end = time.perf_counter()
        best_keys, best_lookup = min(best_keys, mid - start), min(best_lookup, end - mid)
    return best_keys, best_lookup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunks", type=int, default=1_000_000)
    parser.add_argument("--prompt-tokens", type=int, default=128 * 1024)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tokens = np.random.default_rng(1).integers(0, 128_000, args.prompt_tokens, dtype=np.uint32)
    results = {}
    from kvcore.plugins import get_registry

    for policy in sorted(get_registry(allow=[]).eviction_policies):
        empty = CacheEngine(load_settings(eviction=policy, cpu_size=1 << 40))
        _, base_lookup = time_lookup(empty, tokens, args.repeat)
        empty.close()

        per_chunk = metadata_bytes_per_chunk(policy, min(args.chunks, 200_000))
        engine = CacheEngine(load_settings(eviction=policy, cpu_size=1 << 40))
        fill_index(engine, args.chunks)  # not under tracemalloc: it slows every later allocation
        key_time, lookup_time = time_lookup(engine, tokens, args.repeat)
        # store the prompt so the lookup walks all its chunks as hits
        keys = chunk_keys(Namespace("bench-model"), tokens, engine.chunk_size)
        engine.store_buffers(keys, [b"x"] * len(keys)).wait(60)
        _, hit_lookup = time_lookup(engine, tokens, args.repeat)
        engine.close()
        results[policy] = {
            "indexed_chunks": args.chunks,
            "hash_ms": key_time * 1e3,
            "lookup_miss_ms": lookup_time * 1e3,
            "lookup_hit_ms": hit_lookup * 1e3,
            "lookup_empty_index_ms": base_lookup * 1e3,
            "ratio_full_vs_empty": lookup_time / base_lookup,
            "metadata_bytes_per_chunk": per_chunk,
        }
    summary = {"prompt_tokens": args.prompt_tokens, "chunk_size": 256,
               "machine": platform.machine(), "policies": results}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{args.prompt_tokens}-token prompt ({args.prompt_tokens // 256} chunks), "
          f"{args.chunks:,} chunks indexed, {platform.machine()}")
    for policy, r in results.items():
        print(f"  {policy:<13} keys {r['hash_ms']:.2f} ms"
              f" | lookup miss {r['lookup_miss_ms']:.3f} ms"
              f" hit {r['lookup_hit_ms']:.3f} ms (empty index {r['lookup_empty_index_ms']:.3f} ms,"
              f" ratio {r['ratio_full_vs_empty']:.2f})"
              f" | {r['metadata_bytes_per_chunk']:.0f} B/chunk")


if __name__ == "__main__":
    main()
