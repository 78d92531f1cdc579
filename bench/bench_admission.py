"""What KVCORE_LOWER_ADMISSION=reused saves: trace replays through a real engine with a small
CPU tier over a real LMDB tier, writing every stored chunk below (``all``, the baseline) or only
chunks asked for a second time (``reused``), in the same run.

    python bench/bench_admission.py [--json] [--cpu-blocks 1000] [--requests 4000]

Per trace and mode: the hit ratio (leading cached blocks over all asked, from any tier), the
blocks and bytes written to LMDB, and bytes written per hit token; then the ratios of
``reused`` to ``all``. Each request looks up its blocks, reads the hits (lower-tier hits are
promoted into memory, as a load does) and stores the rest. Needs kvcore-lmdb.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from kvcore.config import load_settings
from kvcore.engine import CacheEngine
from kvcore.plugins import PluginRegistry
from kvcore.trace import synth
from kvcore.trace.format import BLOCK_TOKENS, load_trace
from kvcore.trace.replay import prepare, to_keys

PAYLOAD = 4096
SHIPPED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "traces" / \
    "mooncake_synthetic_trace.jsonl"


def replay(keys: list[list[bytes]], cpu_blocks: int, mode: str, path: Path) -> dict[str, float]:
    os.environ["KVCORE_LMDB_PATH"] = str(path)
    os.environ["KVCORE_LMDB_SIZE"] = "8GiB"
    settings = load_settings(tiers=["cpu", "lmdb"], chunk_size=BLOCK_TOKENS,
                             cpu_size=cpu_blocks * PAYLOAD, lower_admission=mode,
                             store_queue_size=4)
    payload = bytes(PAYLOAD)
    hits = asked = 0
    with CacheEngine(settings, registry=PluginRegistry().load(["lmdb"])) as engine:
        for row in keys:
            if not row:
                continue
            n = engine.lookup(row, prefetch=False).chunks
            if n:
                engine.acquire(row[:n]).close()
            hits += n
            asked += len(row)
            if n < len(row):
                engine.store_buffers(row, [payload] * len(row)).wait()
            engine.flush(60)
        written = engine.metrics.get("bytes_written_total", "lmdb")
    return {"hit_ratio": hits / asked, "bytes_written": written,
            "blocks_written": written / PAYLOAD,
            "bytes_written_per_hit_token": written / max(1, hits * BLOCK_TOKENS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-blocks", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    traces = {"sessions": synth.sessions(args.requests),
              "documents": synth.documents(args.requests),
              "conversations": synth.conversations(args.requests)}
    if SHIPPED.exists():
        traces["mooncake (shared/data)"] = load_trace(SHIPPED)
    report: dict[str, dict[str, Any]] = {}
    for name, requests in traces.items():
        blocks, _, _ = prepare(requests)
        keys = to_keys(blocks)
        row: dict[str, Any] = {}
        for mode in ("all", "reused"):
            with tempfile.TemporaryDirectory(prefix="kvcore-admission-") as tmp:
                row[mode] = replay(keys, args.cpu_blocks, mode, Path(tmp))
        row["bytes_written_ratio"] = row["reused"]["bytes_written"] / max(
            1, row["all"]["bytes_written"])
        row["hit_ratio_ratio"] = row["reused"]["hit_ratio"] / max(1e-9, row["all"]["hit_ratio"])
        report[name] = row
        if not args.json:
            a, r = row["all"], row["reused"]
            print(f"{name:<24} hit all {a['hit_ratio']:.3f} reused {r['hit_ratio']:.3f} "
                  f"(x{row['hit_ratio_ratio']:.3f}); blocks written all "
                  f"{a['blocks_written']:.0f} reused {r['blocks_written']:.0f} "
                  f"(x{row['bytes_written_ratio']:.3f}); bytes/hit token "
                  f"{a['bytes_written_per_hit_token']:.1f} -> "
                  f"{r['bytes_written_per_hit_token']:.1f}", flush=True)
    if args.json:
        print(json.dumps({"cpu_blocks": args.cpu_blocks, "payload_bytes": PAYLOAD,
                          "traces": report}, indent=1))


if __name__ == "__main__":
    main()
