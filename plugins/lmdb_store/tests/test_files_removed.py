"""Issue 17: the store's files pulled away while it is open (a cache cleaner, an operator).

Deleting lock.mdb while writers ran lost 54% of stored chunks and killed a writer with an LMDB
assertion (SIGABRT); deleting data.mdb lost 79%, without a word. Now every write (and every
``check_s`` a read) compares the files' inodes with those opened: a removed data.mdb is restored
from the copy still open, and the store is reopened, with one warning. Figures are printed.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import lmdb_workers as w
import pytest

from kvcore import chunk_format
from kvcore.eviction.lru import LRUPolicy
from kvcore_lmdb.settings import LmdbSettings
from kvcore_lmdb.tier import LmdbTier

WORKERS = Path(w.__file__)


def _framed(key: bytes) -> list:
    return chunk_format.encode(key, w.payload_for(key, 512, 40_000), 2)


def _intact(tier: LmdbTier, keys: list[bytes]) -> int:
    good = 0
    for key, value in zip(keys, tier.get(keys)):
        if value is not None:
            assert bytes(value) == b"".join(bytes(p) for p in _framed(key))  # never wrong bytes
            good += 1
    return good


@pytest.mark.parametrize("victim", ["data.mdb", "lock.mdb", "both"])
def test_files_removed_under_an_open_tier_lose_nothing(tmp_path, caplog, victim, figure) -> None:
    caplog.set_level(logging.WARNING, logger="kvcore.lmdb")
    settings = LmdbSettings(path=tmp_path / "store", size=1024**3, inline_max=w.INLINE_MAX)
    tier = LmdbTier(settings, LRUPolicy)
    keys = w.keys_for(f"removed-{victim}", 60)
    assert all(tier.put([(k, _framed(k)) for k in keys[:30]]))
    for name in (["data.mdb", "lock.mdb"] if victim == "both" else [victim]):
        os.unlink(tmp_path / "store" / "index" / name)
    assert all(tier.put([(k, _framed(k)) for k in keys[30:]]))  # this write notices
    assert _intact(tier, keys) == 60
    tier.close()
    fresh = LmdbTier(settings, LRUPolicy)  # what the next process sees
    try:
        kept = _intact(fresh, keys)
    finally:
        fresh.close()
    lines = [r.getMessage() for r in caplog.records if "removed or replaced" in r.getMessage()]
    figure(f"{victim} deleted under an open tier: {60 - kept} of 60 stored chunks lost; "
          f"log: {lines}")
    assert kept == 60
    assert len(lines) == 1 and "KVCORE_LMDB_PATH" in lines[0]


def _start(path: Path, worker_id: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKERS), "steady", str(path), str(worker_id)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("victim", ["lock.mdb", "data.mdb"])
def test_files_removed_while_writer_processes_run(tmp_path, victim, figure) -> None:
    """Two writer processes; a file is deleted mid-run and a third process opens the store
    afresh (which, with lock.mdb gone, used to take a second writer lock)."""
    path = tmp_path / "store"
    LmdbTier(LmdbSettings(path=path, size=1024**3), LRUPolicy).close()
    procs = [_start(path, i) for i in range(2)]
    early: list[list[str]] = [[], []]
    for i, proc in enumerate(procs):  # let both write a little (bounded)
        assert proc.stdout is not None
        for _ in range(20):
            line = proc.stdout.readline()
            early[i].append(line)
            if line.startswith("batch 10"):
                break
    os.unlink(path / "index" / victim)
    time.sleep(0.3)  # the running writers notice (check_s=0.05) and restore or reopen
    procs.append(_start(path, 2))
    outs = []
    for proc in procs:
        assert proc.stdout is not None and proc.stderr is not None
        out = proc.stdout.read()  # (not communicate(): it would skip what readline buffered)
        err = proc.stderr.read()
        outs.append((proc.wait(timeout=120), out, err))
    stored: list[bytes] = []
    refused = 0
    for worker_id, (code, out, err) in enumerate(outs):
        assert code == 0, f"writer {worker_id} exited {code}: {err[-2000:]}"
        if worker_id < 2:
            out = "".join(early[worker_id]) + out
        keys = w.keys_for(f"steady-{worker_id}", 2 * w.STEADY_BATCHES)
        for line in out.splitlines():
            if line.startswith("batch "):
                b, flags = int(line.split()[1]), line.split()[2]
                stored += [k for k, f in zip(keys[2 * b: 2 * b + 2], flags) if f == "1"]
                refused += flags.count("0")
    tier = LmdbTier(LmdbSettings(path=path, size=1024**3, inline_max=w.INLINE_MAX), LRUPolicy)
    try:
        kept = _intact(tier, stored)
    finally:
        tier.close()
    lost = len(stored) - kept
    figure(f"{victim} deleted while 2 writers ran (+1 opening afresh): {len(stored)} chunks "
          f"stored ({refused} refused), {lost} lost "
          f"({100 * lost / max(1, len(stored)):.1f}%), exit codes "
          f"{[o[0] for o in outs]}")
    # One clear line per event in each running writer: the deletion, and possibly the fresh
    # process's new file replacing the restored one a moment later (two events, two lines).
    notices = [o[2].count("removed or replaced") for o in outs[:2]]
    assert all(1 <= n <= 2 for n in notices), notices
    assert lost == 0
