"""KVCORE_LMDB_CODEC on a real LMDB store: fewer bytes on disk, a new engine reads them back
(lossless exactly, int8 as the codec's deterministic round trip), a corrupted file is a miss."""

from __future__ import annotations

import numpy as np
import pytest

from kvcore import chunk_format
from kvcore.config import ConfigError, load_settings
from kvcore.engine import CacheEngine
from kvcore.keys import Namespace
from kvcore.plugins import PluginRegistry

CHUNK = 16
NS = Namespace("lmdb-codec", dtype="bfloat16")


def kv(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal(n) * np.repeat(rng.uniform(0.1, 6, n // 64 + 1), 64)[:n])
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()


def _engine(env, path, codec: str) -> CacheEngine:
    for name, value in dict(KVCORE_LMDB_PATH=str(path), KVCORE_LMDB_SIZE="256MiB",
                            KVCORE_LMDB_CODEC=codec, KVCORE_LMDB_INLINE_MAX="4KiB").items():
        env.setenv(name, value)
    return CacheEngine(load_settings(tiers=["cpu", "lmdb"], chunk_size=CHUNK),
                       registry=PluginRegistry().load(["lmdb"]))


@pytest.mark.parametrize("codec", ["shuffle-zstd", "int8"])
def test_a_new_engine_reads_encoded_chunks_back(tmp_path, kvcore_env, codec: str) -> None:
    payloads = [kv(64 * 1024, seed=i) for i in range(4)]
    first = _engine(kvcore_env, tmp_path, codec)
    try:
        keys = first.keys_for(NS, range(4 * CHUNK))
        assert first.store_buffers(keys, payloads).wait(10) == 4
        assert first.flush(30)
        written = first.metrics.get("bytes_written_total", "lmdb")
        assert 0 < written < 0.9 * sum(map(len, payloads))
    finally:
        first.close()
    files = [f for f in (tmp_path / "chunks").rglob("*") if f.is_file()]
    assert files and sum(f.stat().st_size for f in files) < 0.9 * sum(map(len, payloads))
    second = _engine(kvcore_env, tmp_path, "none")  # the reader's codec setting is not used
    try:
        second.note_namespace(NS)
        with second.acquire(keys) as lease:
            loaded = [bytes(v) for v in lease.views]
        assert len(loaded) == 4
        for key, got, sent in zip(keys, loaded, payloads):
            if codec == "int8":
                assert got != sent
                assert got == second.codecs.as_loaded(key, np.frombuffer(sent, np.uint8)).tobytes()
            else:
                assert got == sent
    finally:
        second.close()


def test_a_corrupted_encoded_file_is_a_miss_and_removed(tmp_path, kvcore_env) -> None:
    first = _engine(kvcore_env, tmp_path, "int8")
    try:
        keys = first.keys_for(NS, range(2 * CHUNK))
        assert first.store_buffers(keys, [kv(64 * 1024, 7), kv(64 * 1024, 8)]).wait(10) == 2
        assert first.flush(30)
    finally:
        first.close()
    files = sorted(f for f in (tmp_path / "chunks").rglob("*") if f.is_file())
    assert len(files) == 2
    for f in files:
        blob = bytearray(f.read_bytes())
        assert chunk_format.open_frame(blob[8:32], blob).codec == "int8"  # type: ignore[union-attr]
        blob[-100] ^= 0x40
        f.write_bytes(blob)
    second = _engine(kvcore_env, tmp_path, "int8")
    try:
        with second.acquire(keys) as lease:
            assert len(lease) == 0
        assert second.metrics.get("corrupt_chunks_total", "lmdb") == 2
        assert second.tiers[1].contains(keys) == [False, False]
    finally:
        second.close()


def test_an_unknown_codec_is_a_config_error_naming_the_variable(tmp_path, kvcore_env) -> None:
    with pytest.raises(ConfigError, match="KVCORE_LMDB_CODEC: unknown codec 'lz5'"):
        _engine(kvcore_env, tmp_path, "lz5")
