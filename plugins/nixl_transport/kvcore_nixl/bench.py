"""``kvcore bench transfer``: kvcore's chunk-batch reads against NIXL's raw READ of the same bytes.

Starts a peer process (:mod:`kvcore_nixl.peer`) holding ``--chunks`` chunks, then alternates,
in one run and over the same UCX connection:

- **kvcore**: :meth:`PeerClient.read` of the whole batch: the lease request on the side channel,
  the peer's registration of its chunks, a fresh local registration, one READ, the completion
  notification, both deregistrations;
- **raw**: NIXL alone at its best: the same remote chunks and a local buffer registered once,
  one prepared transfer handle re-posted each time.

``ratio`` is kvcore's median GB/s over raw's. Bytes read by kvcore are checked once.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chunks", type=int, default=32, help="chunks per batch")
    parser.add_argument("--chunk-mib", type=float, default=2.0, help="MiB per chunk")
    parser.add_argument("--iters", type=int, default=10, help="timed batches per method")
    parser.add_argument("--ucx-tls", default=os.environ.get("UCX_TLS", "cma,tcp"),
                        help="UCX transports (loopback here: cma,tcp or tcp)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ["UCX_TLS"] = args.ucx_tls
    from kvcore_nixl.agent import Agent
    from kvcore_nixl.client import PeerClient
    from kvcore_nixl.peer import chunk_payload, peer_keys, read_ready

    nbytes = int(args.chunk_mib * 1024 * 1024)
    keys = peer_keys(args.chunks, "bench")
    peer = subprocess.Popen(
        [sys.executable, "-m", "kvcore_nixl.peer", "--chunks", str(args.chunks),
         "--chunk-bytes", str(nbytes), "--tenant", "bench"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    agent = Agent()
    client: PeerClient | None = None
    try:
        info = read_ready(peer.stdout)
        from kvcore.config import load_settings
        from kvcore_nixl.settings import NixlSettings

        client = PeerClient(info["address"], agent, timeout_s=60.0, connect_timeout_s=5.0,
                            secret=load_settings(NixlSettings).secret_bytes())
        got = client.read(keys)
        if any(v is None or not np.array_equal(np.frombuffer(v, np.uint8), chunk_payload(k, nbytes))
               for k, v in zip(keys, got)):
            raise RuntimeError("kvcore read returned wrong bytes")
        raw = _RawReader(client, agent, keys)
        try:
            kv_times, raw_times = [], []
            for i in range(args.iters + 2):
                t = _timed(lambda: client.read(keys))
                r = _timed(raw.read)
                if i >= 2:  # the first two of each warm up
                    kv_times.append(t)
                    raw_times.append(r)
        finally:
            raw.close()
    finally:
        if client is not None:
            client.close()
        peer.stdin.close()  # type: ignore[union-attr]
        try:
            peer.wait(10)
        except subprocess.TimeoutExpired:
            peer.kill()
            peer.wait()
    total = nbytes * args.chunks
    kv_gbs = total / statistics.median(kv_times) / 1e9
    raw_gbs = total / statistics.median(raw_times) / 1e9
    return {
        "compared": "kvcore PeerClient.read vs raw NIXL READ of the same chunks (2 processes)",
        "batch_bytes": total,
        "chunks": args.chunks,
        "chunk_bytes": nbytes,
        "iters": args.iters,
        "ucx_tls": args.ucx_tls,
        "kvcore_gbps": round(kv_gbs, 3),
        "raw_gbps": round(raw_gbs, 3),
        "ratio": round(kv_gbs / raw_gbs, 3),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.node()}",
    }


def _timed(fn: Any) -> float:
    started = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - started
    if isinstance(result, list) and any(v is None for v in result):
        raise RuntimeError("a read failed during the benchmark")
    return elapsed


class _RawReader:
    """NIXL only: lease the chunks once, then re-post one prepared READ."""

    def __init__(self, client: Any, agent: Any, keys: list[bytes]) -> None:
        self.client, self.agent = client, agent
        reply, metadata = client.request({"op": "lease"}, b"".join(keys))
        self.lease = reply["lease"]
        remote = [(int(a), int(n)) for a, n in reply["chunks"]]
        agent.nixl.add_remote_agent(metadata)
        self.buffer = np.empty(sum(n for _, n in remote), dtype=np.uint8)
        base, local, offset = int(self.buffer.ctypes.data), [], 0
        for _, n in remote:
            local.append((base + offset, n))
            offset += n
        self.descs = agent.register([(base, self.buffer.nbytes)])
        self.handle = agent.nixl.initialize_xfer(
            "READ", agent.xfer_descs(local), agent.xfer_descs(remote), client.remote_agent)

    def read(self) -> None:
        state = self.agent.nixl.transfer(self.handle)
        while state == "PROC":
            time.sleep(0.0001)
            state = self.agent.nixl.check_xfer_state(self.handle)
        if state != "DONE":
            raise RuntimeError(f"raw transfer failed: {state}")

    def close(self) -> None:
        self.handle.release()
        self.agent.deregister(self.descs)
        self.client.request({"op": "release", "lease": self.lease})
