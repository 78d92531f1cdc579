"""A prefill-side kvcore instance: a real CacheEngine (KVCORE_TIERS=cpu,nixl_peer,
KVCORE_NIXL_SERVE=1) that stores a prompt's chunks as usual and serves them to peers."""

import json
import sys

from kvcore.config import load_settings
from kvcore.engine import CacheEngine
from kvcore.keys import Namespace
from kvcore_nixl.peer import READY, chunk_payload


def main() -> int:
    chunks, nbytes = int(sys.argv[1]), int(sys.argv[2])
    engine = CacheEngine(load_settings(tiers=["cpu", "nixl_peer"], chunk_size=16))
    keys = engine.keys_for(Namespace("pd-test"), list(range(chunks * 16)))
    engine.store_buffers(keys, [chunk_payload(k, nbytes) for k in keys]).wait(30)
    server = engine.lower[0].tier.server
    print(READY + json.dumps({"address": server.address}), flush=True)
    try:
        sys.stdin.read()
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
