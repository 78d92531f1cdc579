"""Eviction at scale: does per-operation cost stay flat from 10K to 1M indexed chunks, what
does the index cost per chunk, and how fast does a trace replay through the engine?

    python bench/bench_eviction.py [--json] [--large 1000000] [--trace FILE]

Compares each policy with LRU (the baseline) in the same run; prints the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import tracemalloc

from kvcore.plugins import get_registry

POLICIES = ("lru", "prefix_lru", "prefix_value")


def key(i: int) -> bytes:
    return i.to_bytes(24, "little")


def fill(name: str, n: int, chain: int = 32):  # type: ignore[no-untyped-def]
    """A policy holding ``n`` chunks in chains of ``chain`` blocks."""
    policy = get_registry().policy_factory(name)()
    for i in range(n):
        policy.insert(key(i), 64, key(i - 1) if i % chain else None)
    return policy


def op_cost(name: str, n: int, ops: int = 20_000) -> float:
    """Microseconds per steady-state step (touch a chunk, evict one, insert one) at size n."""
    policy = fill(name, n)
    step = 7919
    next_id = n
    started = time.perf_counter()
    for j in range(ops):
        policy.touch(key((j * step) % n))
        victim = policy.victim()
        if victim is not None:
            policy.remove(victim)
        policy.insert(key(next_id), 64, None)
        next_id += 1
    return (time.perf_counter() - started) / ops * 1e6


def bytes_per_chunk(name: str, n: int = 100_000) -> float:
    """Python heap bytes the policy's index takes per chunk (keys excluded: the tier owns them)."""
    keys = [key(i) for i in range(n)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    policy = get_registry().policy_factory(name)()
    for i, k in enumerate(keys):
        policy.insert(k, 64, keys[i - 1] if i % 32 else None)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del policy
    return used / n


def replay_speed(trace: str | None, capacity: int) -> dict:
    from kvcore.trace.format import load_trace
    from kvcore.trace.replay import prepare, replay, to_keys
    from kvcore.trace.synth import documents

    requests = load_trace(trace) if trace else documents(3000)
    keys = to_keys(prepare(requests)[0])
    out = {}
    for name in POLICIES:
        result = replay(keys, capacity, name)
        out[name] = round(result.requests / result.seconds, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--trace", default=None)
    parser.add_argument("--capacity-blocks", type=int, default=5000)
    args = parser.parse_args()
    figures: dict = {"machine": f"{platform.processor() or platform.machine()}, "
                                f"{os.cpu_count()} cores, Python {platform.python_version()}"}
    for name in POLICIES:
        small, large = op_cost(name, args.small), op_cost(name, args.large)
        figures[name] = {f"us_per_op_{args.small}": round(small, 2),
                         f"us_per_op_{args.large}": round(large, 2),
                         "large_over_small": round(large / small, 2),
                         "index_bytes_per_chunk": round(bytes_per_chunk(name), 1)}
    figures["replay_requests_per_s"] = replay_speed(args.trace, args.capacity_blocks)
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    for name, value in figures.items():
        print(f"{name:<24} {value}")


if __name__ == "__main__":
    main()
