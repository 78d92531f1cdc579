"""A prefill-side kvcore instance: a real CacheEngine (KVCORE_TIERS=cpu,nixl_peer,
KVCORE_NIXL_SERVE=1) that stores a prompt's chunks as usual and serves them to peers.

``_producer.py CHUNKS BYTES [--slow-store SECONDS]``: with ``--slow-store`` the store's fill
takes that long and the producer announces itself while the store still runs (a decode side
asking right after the prefill answered).
"""

import argparse
import json
import sys
import time
from collections.abc import Sequence

import numpy as np

from kvcore.config import load_settings
from kvcore.engine import CacheEngine
from kvcore.keys import Namespace
from kvcore_nixl.peer import READY, chunk_payload


class SlowSource:
    """A ChunkSource whose gather takes ``delay_s`` (a busy engine's copy)."""

    def __init__(self, payloads: list[np.ndarray], delay_s: float) -> None:
        self.payloads, self.delay_s = payloads, delay_s

    def chunk_nbytes(self) -> int:
        return self.payloads[0].nbytes

    def fill(self, indices: Sequence[int], dests: Sequence[np.ndarray]) -> None:
        time.sleep(self.delay_s)
        for i, dest in zip(indices, dests):
            dest[:] = self.payloads[i]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("chunks", type=int)
    parser.add_argument("nbytes", type=int)
    parser.add_argument("--slow-store", type=float, default=0.0)
    args = parser.parse_args()
    engine = CacheEngine(load_settings(tiers=["cpu"], chunk_size=16))  # serving needs no tier
    keys = engine.keys_for(Namespace("pd-test"), list(range(args.chunks * 16)))
    payloads = [chunk_payload(k, args.nbytes) for k in keys]
    if args.slow_store:
        engine.store(keys, SlowSource(payloads, args.slow_store))
    else:
        engine.store_buffers(keys, payloads).wait(30)
    server = engine.attachments["nixl_server"]
    print(READY + json.dumps({"address": server.address}), flush=True)
    try:
        sys.stdin.read()
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
