"""LMDB below ``kvcore server``: one LMDB environment per host, owned by the server, written
behind from the shared memory tier and read back into it for every engine attached. A real
server process, a real LMDB environment; the engines attach as an engine does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("zmq")
pytest.importorskip("msgspec")

from kvcore.config import load_settings  # noqa: E402
from kvcore.engine import CacheEngine  # noqa: E402
from kvcore.keys import Namespace  # noqa: E402
from kvcore.testing.server import ServerProcess, serving  # noqa: E402

NS = Namespace("lmdb-behind-server")
CHUNK = 4
CHUNK_BYTES = 1 << 16
MEMORY_CHUNKS = 4


def values(n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, CHUNK_BYTES, dtype=np.uint8).tobytes() for _ in range(n)]


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServerProcess]:
    """A server whose memory holds 4 chunks, with LMDB below it."""
    srv = ServerProcess(tmp_path, budget=MEMORY_CHUNKS * CHUNK_BYTES, env={
        "KVCORE_TIERS": "cpu,lmdb", "KVCORE_LMDB_PATH": str(tmp_path / "lmdb"),
        "KVCORE_LMDB_SIZE": str(64 << 20), "KVCORE_CHUNK_SIZE": str(CHUNK)})
    monkeypatch.setenv("KVCORE_TIERS", "cpu,lmdb")  # the engines' own environment says so too
    monkeypatch.setenv("KVCORE_LMDB_PATH", str(tmp_path / "engine-lmdb"))
    yield from serving(srv, monkeypatch.setenv)


def attached() -> CacheEngine:
    return CacheEngine(load_settings(chunk_size=CHUNK))


def wait_until(check, timeout: float = 15.0):  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_engines_read_what_the_server_wrote_behind(server: ServerProcess,
                                                   tmp_path: Path) -> None:
    tokens = list(range(4 * CHUNK))
    stored = values(4, seed=1)
    with attached() as a:
        assert [t.name for t in a.tiers] == ["server"]  # the LMDB below is the server's
        assert a.memory.below == ("lmdb",)
        keys = a.keys_for(NS, tokens)
        a.store_buffers(keys, stored).wait(10)
        assert a.flush()  # the server's write-behind included
        # Other chunks take the memory (a chunk being copied down is held, so a store that
        # came meanwhile would find no room).
        assert store_until_held(a, a.keys_for(NS, list(range(500, 500 + 4 * CHUNK))),
                                values(4, seed=9))
    assert not (tmp_path / "engine-lmdb").exists()  # no engine opened an environment

    with attached() as b:
        keys = b.keys_for(NS, tokens)
        result = b.lookup(keys)
        assert result.chunks == 4 and result.by_tier == {"lmdb": 4}, result
        with b.acquire(keys) as lease:  # the server brings them up, verified
            assert [bytes(v) for v in lease.views] == stored
        assert b.lookup(keys).by_tier == {"server": 4}  # in shared memory again
        assert b.planner.tier("lmdb").per_chunk_s is not None  # the server's measurement


def store_until_held(engine: CacheEngine, keys: list[bytes], stored: list[bytes]) -> bool:
    def stored_all() -> bool:
        engine.store_buffers(keys, stored).wait(10)
        return engine.lookup(keys).by_tier.get("server") == len(keys)

    return bool(wait_until(stored_all))


def test_the_cache_outlives_a_server_restart_through_lmdb(server: ServerProcess,
                                                          tmp_path: Path) -> None:
    tokens = list(range(100, 100 + 4 * CHUNK))
    stored = values(4, seed=2)
    with attached() as a:
        keys = a.keys_for(NS, tokens)
        a.store_buffers(keys, stored).wait(10)
        assert a.flush()  # the server's write-behind included
        # Evict them from memory with other chunks: LMDB holds them.
        assert store_until_held(a, a.keys_for(NS, list(range(900, 900 + 4 * CHUNK))),
                                values(4, 3))
        assert wait_until(lambda: a.lookup(keys).by_tier.get("lmdb") == 4), a.lookup(keys)
    server.stop()  # the shared memory is gone with the server: LMDB keeps the chunks
    server.start()
    with attached() as b:
        keys = b.keys_for(NS, tokens)
        assert wait_until(lambda: b.lookup(keys).chunks == 4)
        with b.acquire(keys) as lease:
            assert [bytes(v) for v in lease.views] == stored


def test_delete_and_clear_reach_the_servers_lower_tier(server: ServerProcess) -> None:
    tokens = list(range(200, 200 + 2 * CHUNK))
    with attached() as a:
        keys = a.keys_for(NS, tokens)
        a.store_buffers(keys, values(2, seed=4)).wait(10)
        assert a.flush()
        assert store_until_held(a, a.keys_for(NS, list(range(800, 800 + 4 * CHUNK))),
                                values(4, 5))
        assert wait_until(lambda: a.lookup(keys).by_tier.get("lmdb") == 2)
        a.acquire(keys).close()  # the prefetch that lookup started is done
        assert a.delete(keys[1:]) == 2  # from both tiers of the server
        assert a.lookup(keys).chunks == 1
        assert a.clear(NS) >= 1
        assert a.lookup(keys).chunks == 0
        assert a.lookup(a.keys_for(NS, list(range(800, 800 + 4 * CHUNK)))).chunks == 0


def test_a_lookup_right_after_a_store_sees_all_of_it(server: ServerProcess) -> None:
    """Commits are one way on the main socket and a lookup goes to the server's lower tiers
    on the other: it must not overtake them (it did, now and then, before the client made
    its commits certain first). Each round fills the memory, so that the server evicts
    meanwhile, then flushes (chunks still being written behind could not be evicted for the
    next round); many rounds, since the race is one of timing."""
    with attached() as a:
        for round_ in range(40):
            tokens = list(range(1000 * round_, 1000 * round_ + MEMORY_CHUNKS * CHUNK))
            keys = a.keys_for(NS, tokens)
            a.store_buffers(keys, values(MEMORY_CHUNKS, seed=round_)).wait(10)
            assert a.lookup(keys).by_tier == {"server": MEMORY_CHUNKS}, f"round {round_}"
            assert a.flush()
