"""SIGKILL a writer at random moments, 20 rounds: the store always opens and never lies."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

import lmdb_workers as W

from kvcore_lmdb import files

ROUNDS = 20


def _start_writer(path, round_id: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, W.__file__, "crash", str(path), str(round_id)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_sigkill_during_heavy_writes_never_loads_a_corrupt_chunk(tmp_path) -> None:
    path = tmp_path / "store"
    rng = random.Random(1234)
    committed_rounds = 0
    for round_id in range(ROUNDS):
        proc = _start_writer(path, round_id)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(rng.uniform(0.02, 0.6))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, f"writer finished before the kill: {out}"
        committed_rounds += "put " in out

        tier = W.open_tier(path, W.CRASH_BUDGET)  # opens after every kill
        good, bad = W.check_store(tier)
        usage = tier.usage()
        assert bad == 0, f"round {round_id}: {bad} corrupt loads"
        assert usage.used_bytes <= usage.budget_bytes
        assert usage.chunks == len(list(tier.iter_keys())) == good
        tier.close()
    # writers got the (robust) write lock back from killed predecessors: a stuck lock would
    # leave every later round without a commit (a kill may also come before the first commit)
    assert committed_rounds >= ROUNDS // 2
    tier = W.open_tier(path, W.CRASH_BUDGET)
    key = W.keys_for("after-crashes", 1)[0]
    assert tier.put([(key, W.chunk_format.encode(key, W.payload_for(key), 2))]) == [True]
    tier.collect_orphans(age_s=0)
    on_disk = sorted(name.split(".")[0] for name, _ in files.iter_files(tier.chunks_dir))
    in_files = sorted(k.hex() for k in tier.iter_keys() if len(W.framed_for(k)) > W.INLINE_MAX)
    assert on_disk == in_files  # no leaked payload files once orphans are collected
    assert W.check_store(tier) == (tier.usage().chunks, 0)
    tier.close()
