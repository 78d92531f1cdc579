"""The byte budget holds, victims follow the policy, pins hold, and all of it is shared."""

from __future__ import annotations

import lmdb_workers as W

from kvcore import chunk_format

CHUNK = 100_000
FRAMED = CHUNK + chunk_format.HEADER_BYTES


def _put(tier, keys) -> list[bool]:
    return tier.put([(k, chunk_format.encode(k, b"x" * CHUNK, 2)) for k in keys])


def test_lru_victims_and_budget(tmp_path) -> None:
    tier = W.open_tier(tmp_path / "s", 4 * FRAMED)
    keys = W.keys_for("lru", 6)
    assert all(_put(tier, keys[:4]))
    assert tier.get([keys[0]])[0] is not None  # keys[0] becomes most recent
    assert all(_put(tier, keys[4:6]))
    assert tier.contains(keys) == [True, False, False, True, True, True]
    assert tier.usage().used_bytes == 4 * FRAMED and tier.stats["evicted"] == 2
    tier.close()


def test_pinned_chunks_are_never_victims(tmp_path) -> None:
    tier = W.open_tier(tmp_path / "s", 2 * FRAMED)
    keys = W.keys_for("pin", 3)
    assert all(_put(tier, keys[:2]))
    assert tier.pin(keys[:2]) == 2
    assert _put(tier, keys[2:]) == [False]  # nothing evictable
    assert tier.unpin(keys[:1]) == 1
    assert _put(tier, keys[2:]) == [True]
    assert tier.contains(keys) == [False, True, True]
    tier.close()


def test_second_process_view_is_shared(tmp_path) -> None:
    """Two tier instances stand for two processes: usage and victims come from the index."""
    a = W.open_tier(tmp_path / "s", 3 * FRAMED)
    b = W.open_tier(tmp_path / "s", 3 * FRAMED)
    keys = W.keys_for("shared", 5)
    assert all(_put(a, keys[:2]))
    assert all(_put(b, keys[2:3]))
    assert b.get([keys[0]])[0] is not None and b.flush_hits()  # b's hit is shared
    assert all(_put(a, keys[3:5]))  # a must evict b's view of the LRU: keys[1], keys[2]
    assert a.contains(keys) == [True, False, False, True, True]
    assert a.usage().used_bytes == b.usage().used_bytes == 3 * FRAMED
    a.close()
    b.close()


def test_hits_reach_the_shared_clock_in_the_background(tmp_path, monkeypatch) -> None:
    import time

    from kvcore_lmdb import tier as tier_module
    from kvcore_lmdb.index import Entry

    tier = W.open_tier(tmp_path / "s", 4 * FRAMED)
    keys = W.keys_for("clock", 2)
    assert all(_put(tier, keys))
    store = tier._available()

    def seq(key: bytes) -> int:
        with store.env.begin(db=store.entries) as txn:
            return Entry.unpack(txn.get(key)).seq

    before = seq(keys[0])
    assert before < seq(keys[1])
    monkeypatch.setattr(tier_module, "TOUCH_FLUSH_S", 0.0)
    assert tier.get([keys[0]])[0] is not None
    for _ in range(500):
        if seq(keys[0]) > seq(keys[1]):
            break
        time.sleep(0.01)
    assert seq(keys[0]) > seq(keys[1])  # keys[0] is now the most recent for every process
    tier.close()
