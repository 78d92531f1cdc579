"""The ask counter behind KVCORE_LOWER_ADMISSION=reused (the engine path is tested on a real
LMDB tier in plugins/lmdb_store/tests/test_admission.py)."""

from __future__ import annotations

import hashlib

import pytest

from kvcore.admission import AskCounter, LowerAdmission


def key(i: int) -> bytes:
    return b"N" * 8 + hashlib.sha256(i.to_bytes(8, "little")).digest()[:16]


def test_counts_never_fall_below_the_truth_and_saturate() -> None:
    counter = AskCounter(width_bits=10, depth=4)
    keys = [key(i) for i in range(300)]  # a crowded sketch: collisions are certain
    truth = {k: 0 for k in keys}
    for round_ in range(5):
        asked = keys[: 60 * (round_ + 1)]
        counter.ask(asked)
        for k in asked:
            truth[k] += 1
    counts = counter.count(keys)
    assert all(int(c) >= truth[k] for k, c in zip(keys, counts))
    exact = sum(int(c) == truth[k] for k, c in zip(keys, counts))
    assert exact > 0.8 * len(keys)
    hot = [key(10_000)]
    for _ in range(300):
        after = counter.ask(hot)
    assert int(after[0]) == 255


def test_counts_fade() -> None:
    counter = AskCounter(width_bits=8, depth=2)  # halves every 10 x 256 asks
    counter.ask([key(1)])
    counter.ask([key(1)])
    assert int(counter.count([key(1)])[0]) == 2
    for _ in range(10 * 256 - 2):
        counter.ask([key(2)])
    assert int(counter.count([key(1)])[0]) == 1 and int(counter.count([key(2)])[0]) == 127


def test_admission_modes() -> None:
    every = LowerAdmission("all")
    assert every.admit([key(1), key(2)]) == [key(1), key(2)]
    assert every.asked([key(1)], 1) == []
    reused = LowerAdmission("reused")
    keys = [key(1), key(2), key(3)]
    assert reused.asked(keys, 0) == []  # first ask: all missed
    assert reused.admit(keys) == []  # stored after one ask: memory only
    assert reused.asked(keys, 2) == keys[:2]  # second ask, two hit: copy those down
    assert reused.asked(keys, 3) == []  # third ask: already copied
    assert reused.admit([key(3)]) == [key(3)]  # asked twice before this store
    with pytest.raises(ValueError, match="known: all, reused"):
        LowerAdmission("never")
