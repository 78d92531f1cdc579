"""Unusable directory, disk full, map full: a clear message and the engine keeps serving."""

from __future__ import annotations

import errno
import logging
import os

import lmdb_workers as W
import pytest

from kvcore import chunk_format
from kvcore.config import ConfigError, load_settings
from kvcore.engine import CacheEngine
from kvcore.eviction.lru import LRUPolicy
from kvcore.tiers.cpu import CpuTier
from kvcore_lmdb import files
from kvcore_lmdb import tier as tier_module
from kvcore_lmdb.settings import LmdbSettings
from kvcore_lmdb.tier import LmdbTier


def _framed(keys):
    return [(k, chunk_format.encode(k, W.payload_for(k, 90_000, 90_000), 2)) for k in keys]


def test_unusable_directory_is_reported_and_engine_serves_from_memory(tmp_path, caplog) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="kvcore.lmdb"):
        tier = LmdbTier(LmdbSettings(path=blocker / "store"), LRUPolicy)
    assert "KVCORE_LMDB_PATH=" in caplog.text and str(blocker / "store") in caplog.text
    keys = W.keys_for("broken", 3)
    assert tier.put(_framed(keys)) == [False] * 3
    assert tier.get(keys) == [None] * 3 and tier.usage().chunks == 0
    engine = CacheEngine(load_settings(chunk_size=2, tiers=["cpu", "lmdb"]),
                         tiers=[CpuTier(64 * 1024**2, LRUPolicy()), tier])
    try:
        payloads = [os.urandom(1000) for _ in keys]
        assert engine.store_buffers(keys, payloads).wait(10) == 3
        assert engine.flush(10)
        with engine.acquire(keys) as lease:
            assert [bytes(v) for v in lease.views] == payloads
    finally:
        engine.close()


def test_disk_full_refuses_the_chunk_with_a_clear_message(tmp_path, monkeypatch, caplog) -> None:
    tier = W.open_tier(tmp_path / "store", 64 * 1024**2)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "pwritev", full)
    keys = W.keys_for("full", 2)
    with caplog.at_level(logging.WARNING, logger="kvcore.lmdb"):
        assert tier.put(_framed(keys)) == [False, False]
    assert "disk under KVCORE_LMDB_PATH=" in caplog.text and "KVCORE_LMDB_SIZE" in caplog.text
    assert list(files.iter_files(tier.chunks_dir)) == []  # partial files removed
    monkeypatch.undo()
    assert tier.put(_framed(keys)) == [True, True]  # space came back: stores again
    tier.close()


def test_map_full_refuses_with_a_clear_message(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(tier_module, "map_size_for", lambda budget: 256 * 1024)
    tier = LmdbTier(LmdbSettings(path=tmp_path / "store", size=64 * 1024**2,
                                 inline_max=1024**2), LRUPolicy)
    keys = W.keys_for("mapfull", 8)
    with caplog.at_level(logging.WARNING, logger="kvcore.lmdb"):
        results = [tier.put(_framed([k]))[0] for k in keys]
    assert results[0] and not results[-1]
    assert "LMDB index under KVCORE_LMDB_PATH=" in caplog.text
    assert all(tier.contains(keys[:1]))
    tier.close()


def test_settings_from_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("KVCORE_LMDB_PATH", str(tmp_path))
    monkeypatch.setenv("KVCORE_LMDB_SIZE", "2GiB")
    settings = load_settings(LmdbSettings)
    assert settings.path == str(tmp_path) and settings.size == 2 * 1024**3
    monkeypatch.setenv("KVCORE_LMDB_SIZE", "lots")
    with pytest.raises(ConfigError, match="KVCORE_LMDB_SIZE='lots'"):
        load_settings(LmdbSettings)


@pytest.mark.parametrize("path", ["", "   "])
def test_an_empty_path_is_a_config_error_naming_the_variable(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty KVCORE_LMDB_PATH would put the store in whatever directory the engine started
    in; it is refused instead, by the engine and by `kvcore config`."""
    from kvcore.config import ConfigError, load_settings
    from kvcore.engine import CacheEngine

    monkeypatch.setenv("KVCORE_LMDB_PATH", path)
    with pytest.raises(ConfigError, match="KVCORE_LMDB_PATH=.*expected a directory"):
        CacheEngine(load_settings(tiers=["cpu", "lmdb"]))
