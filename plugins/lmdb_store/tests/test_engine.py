"""The tier behind a real engine: built from KVCORE_* settings, found again after a restart."""

from __future__ import annotations

import os
import subprocess
import sys

import lmdb_workers as W

from kvcore.config import load_settings
from kvcore.engine import CacheEngine
from kvcore.plugins import PluginRegistry
from kvcore_lmdb.tier import LmdbTier


def _env(path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCORE_")}
    env.update(KVCORE_TIERS="cpu,lmdb", KVCORE_LMDB_PATH=str(path), KVCORE_LMDB_SIZE="64MiB",
               KVCORE_CHUNK_SIZE="2", KVCORE_PLUGINS="lmdb")
    return env


def test_registered_through_entry_point() -> None:
    registry = PluginRegistry().load(["lmdb"])
    assert "lmdb" in registry.tiers
    assert "LmdbSettings" in registry.settings
    assert "disk" in registry.benchmarks


def test_new_process_finds_what_the_last_one_stored(tmp_path) -> None:
    path = tmp_path / "store"
    first = subprocess.run([sys.executable, W.__file__, "engine", str(path), "0"],
                           env=_env(path), capture_output=True, text=True, timeout=120)
    assert first.returncode == 0 and "stored" in first.stdout, first.stderr
    second = subprocess.run([sys.executable, W.__file__, "engine", str(path), "1"],
                            env=_env(path), capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "found 8 lmdb 8 same True"


def test_engine_settings_pick_path_and_size(tmp_path, monkeypatch) -> None:
    for key, value in _env(tmp_path / "s").items():
        if key.startswith("KVCORE_"):
            monkeypatch.setenv(key, value)
    engine = CacheEngine(load_settings(), registry=PluginRegistry().load(["lmdb"]))
    try:
        tier = engine.tiers[1]
        assert isinstance(tier, LmdbTier)
        assert tier.root == tmp_path / "s" and tier.usage().budget_bytes == 64 * 1024**2
        assert (tmp_path / "s" / "index" / "data.mdb").exists()
    finally:
        engine.close()
