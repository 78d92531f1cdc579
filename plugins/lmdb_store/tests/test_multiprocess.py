"""Several processes write and read one store at once; the global budget holds."""

from __future__ import annotations

import subprocess
import sys

import lmdb_workers as W

from kvcore_lmdb.index import Entry


def test_three_processes_share_one_store(tmp_path) -> None:
    path = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, W.__file__, "mixed", str(path), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(3)]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, f"{out}\n{err}"
        assert out.startswith("hits ") and " bad 0" in out
    assert sum(int(out.split()[1]) for out, _ in outputs) > 0  # they did read each other's

    tier = W.open_tier(path, W.MIXED_BUDGET)
    usage = tier.usage()
    store = tier._available()
    with store.env.begin(db=store.entries) as txn:
        sizes = [Entry.unpack(raw).size for _, raw in txn.cursor()]
    assert 0 < usage.used_bytes <= W.MIXED_BUDGET  # budget global to the store
    assert usage.used_bytes == sum(sizes) and usage.chunks == len(sizes)
    assert tier.collect_orphans(age_s=0) == 0  # evictions by any process removed their files
    good, bad = 0, 0
    for key, value in zip(W.keys_for("mixed", 48), tier.get(W.keys_for("mixed", 48))):
        if value is not None:
            expect = b"".join(bytes(p) for p in W.chunk_format.encode(
                key, W.payload_for(key, large=200_000), 2))
            good += bytes(value) == expect
            bad += bytes(value) != expect
    assert bad == 0 and good == usage.chunks
    tier.close()
