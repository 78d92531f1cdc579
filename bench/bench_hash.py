"""Which hash for chunk keys? Chains SHA-256, BLAKE2b and (if installed) XXH3-128 over a prompt.

Prints ms per 128K-token prompt for each, and the ratio to SHA-256 (the one kvcore uses).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time

import numpy as np


def chain(digest, data: bytes, step: int) -> None:  # type: ignore[no-untyped-def]
    prev = b"\0" * 16
    view = memoryview(data)
    for i in range(0, len(data) - step + 1, step):
        prev = digest(prev, view[i : i + step])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=128 * 1024)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    data = np.random.default_rng(0).integers(0, 2**17, args.tokens, dtype=np.uint32).tobytes()

    def sha256(prev: bytes, chunk: memoryview) -> bytes:
        h = hashlib.sha256(prev)
        h.update(chunk)
        return h.digest()[:16]

    def blake2b(prev: bytes, chunk: memoryview) -> bytes:
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(chunk)
        return h.digest()

    candidates = {"sha256-128 (kvcore)": sha256, "blake2b-128": blake2b}
    try:
        import xxhash

        candidates["xxh3-128 (non-cryptographic)"] = lambda prev, chunk: xxhash.xxh3_128_digest(
            bytes(prev) + bytes(chunk))
    except ImportError:
        pass
    results = {}
    for name, fn in candidates.items():
        best = float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            chain(fn, data, args.chunk_size * 4)
            best = min(best, time.perf_counter() - start)
        results[name] = best * 1e3
    base = results["sha256-128 (kvcore)"]
    if args.json:
        print(json.dumps({"ms_per_prompt": results, "tokens": args.tokens,
                          "machine": platform.processor() or platform.machine()}, indent=2))
        return
    print(f"chained chunk hash over {args.tokens} tokens, chunk {args.chunk_size} "
          f"({platform.machine()}), best of {args.repeat}")
    for name, ms in results.items():
        print(f"  {name:<30} {ms:8.3f} ms   ratio to sha256 {ms / base:5.2f}")


if __name__ == "__main__":
    main()
