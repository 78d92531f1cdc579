"""Bytes flipped or files truncated on disk are misses, counted and removed; never loaded."""

from __future__ import annotations

import os

import lmdb_workers as W

from kvcore.config import load_settings
from kvcore.engine import CacheEngine
from kvcore.eviction.lru import LRUPolicy
from kvcore.tiers.cpu import CpuTier
from kvcore_lmdb import files


def _stored(tmp_path, n: int):
    tier = W.open_tier(tmp_path / "store", 64 * 1024**2)
    keys = W.keys_for("corrupt", n)
    payloads = [os.urandom(100_000) for _ in keys]
    from kvcore import chunk_format

    assert all(tier.put([(k, chunk_format.encode(k, p, 2)) for k, p in zip(keys, payloads)]))
    return tier, keys, payloads


def _file_of(tier, key: bytes):
    name = next(n for n, _ in files.iter_files(tier.chunks_dir) if n.startswith(key.hex()))
    return files.file_path(tier.chunks_dir, name)


def _engine(tier):
    settings = load_settings(chunk_size=2, tiers=["cpu", "lmdb"])
    return CacheEngine(settings, tiers=[CpuTier(256 * 1024**2, LRUPolicy()), tier])


def test_flipped_bytes_are_misses_counted_and_removed(tmp_path) -> None:
    tier, keys, payloads = _stored(tmp_path, 4)
    for key, offset in ((keys[1], 5000), (keys[2], 30)):  # in the payload; in the header
        path = _file_of(tier, key)
        with open(path, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0x40]))
    engine = _engine(tier)
    try:
        with engine.acquire(keys) as lease:
            assert [bytes(v) for v in lease.views] == payloads[:1]  # stops at the first bad one
        with engine.acquire(keys[2:]) as lease:
            assert [bytes(v) for v in lease.views] == []
        corrupt = engine.metrics.get("corrupt_chunks_total", "lmdb") + tier.stats["corrupt"]
        assert corrupt == 2
        assert tier.contains(keys) == [True, False, False, True]
        assert tier.get([keys[3]])[0] is not None
    finally:
        engine.close()


def test_truncated_and_missing_files_are_misses(tmp_path) -> None:
    tier, keys, payloads = _stored(tmp_path, 3)
    os.truncate(_file_of(tier, keys[0]), 70_000)
    os.truncate(_file_of(tier, keys[1]), 0)
    os.unlink(_file_of(tier, keys[2]))
    assert tier.get(keys) == [None, None, None]
    assert tier.stats["corrupt"] == 3
    assert tier.contains(keys) == [False, False, False]
    assert tier.usage().chunks == 0 and tier.usage().used_bytes == 0
    assert list(files.iter_files(tier.chunks_dir)) == []
    tier.close()


def test_foreign_file_under_a_key_is_a_miss(tmp_path) -> None:
    tier, keys, _ = _stored(tmp_path, 2)
    a, b = _file_of(tier, keys[0]), _file_of(tier, keys[1])
    os.replace(a, b)  # keys[1]'s entry now points at keys[0]'s bytes (same size)
    assert tier.get([keys[1]]) == [None]
    assert tier.stats["corrupt"] == 1
    tier.close()


def test_chunk_evicted_during_a_read_is_a_plain_miss(tmp_path, monkeypatch) -> None:
    tier, keys, _ = _stored(tmp_path, 1)
    other = W.open_tier(tmp_path / "store", 64 * 1024**2)  # stands for another process
    real_read = files.read

    def racing_read(root, name, size):
        other.delete(keys)  # evicted between the index lookup and the file read
        return real_read(root, name, size)

    monkeypatch.setattr(files, "read", racing_read)
    assert tier.get(keys) == [None]
    assert tier.stats["corrupt"] == 0
    other.close()
    tier.close()
