"""A stand-alone peer: a CPU tier filled with known chunks, served over NIXL.

``python -m kvcore_nixl.peer --chunks 8 --chunk-bytes 65536`` prints one JSON line
(``{"address": ..., "agent": ...}``) and serves until stdin closes or it is killed. Tests and
``kvcore bench transfer`` use it as the other process; :func:`peer_keys` and
:func:`chunk_payload` tell the reader which keys it holds and what their bytes must be.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

import numpy as np

from kvcore.eviction.lru import LRUPolicy
from kvcore.keys import ChunkKey, Namespace, chunk_keys
from kvcore.tiers.cpu import CpuTier

READY = "KVCORE_NIXL_PEER "


def read_ready(stream: object) -> dict:
    """The JSON a starting peer prints after :data:`READY` (other lines are skipped)."""
    for line in stream:  # type: ignore[attr-defined]
        if line.startswith(READY):
            return json.loads(line[len(READY):])
    raise RuntimeError("the peer exited before it was ready")


def peer_keys(chunks: int, tenant: str = "peer") -> list[ChunkKey]:
    """The prefix keys a peer started with ``--tenant`` holds (4 tokens per chunk)."""
    return chunk_keys(Namespace("kvcore-nixl-peer", tenant=tenant), list(range(chunks * 4)), 4)


def chunk_payload(key: ChunkKey, nbytes: int) -> np.ndarray:
    """Deterministic pseudo-random bytes of a chunk (the same in every process)."""
    seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little")
    return np.frombuffer(np.random.default_rng(seed).bytes(nbytes), dtype=np.uint8)


def filled_tier(keys: list[ChunkKey], nbytes: int) -> CpuTier:
    # Room for 4x the chunks: a peer's leases may hold only part of the budget (issue 17).
    tier = CpuTier(4 * len(keys) * nbytes + 1, LRUPolicy(),
                   allocate=lambda n: np.empty(n, dtype=np.uint8))  # no torch import
    for i, key in enumerate(keys):
        tier.put_one(key, [chunk_payload(key, nbytes).data], keys[i - 1] if i else None)
    return tier


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvcore_nixl.peer")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--chunk-bytes", type=int, default=65536)
    parser.add_argument("--tenant", default="peer")
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--lease-timeout-s", type=float, default=30.0)
    args = parser.parse_args(argv)

    from kvcore_nixl.agent import Agent
    from kvcore_nixl.server import ChunkServer

    tier = filled_tier(peer_keys(args.chunks, args.tenant), args.chunk_bytes)
    from kvcore.config import load_settings
    from kvcore_nixl.settings import NixlSettings

    settings = load_settings(NixlSettings)  # KVCORE_NIXL_SECRET and the server's limits
    server = ChunkServer(tier, Agent(), args.listen, args.lease_timeout_s,
                         secret=settings.secret_bytes(), limits=settings.limits())
    info = {"address": server.address, "agent": server.agent.name}
    print(READY + json.dumps(info), flush=True)
    try:
        sys.stdin.read()  # serve until the parent closes our stdin
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
