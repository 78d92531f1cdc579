"""The ``nixl_peer`` tier behind real CacheEngines: a producer process stores, we load."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from conftest import HERE, closed_address

from kvcore.config import ConfigError, load_settings
from kvcore.engine import CacheEngine
from kvcore.keys import Namespace
from kvcore.plugins import get_registry
from kvcore_nixl.peer import chunk_payload, peer_keys
from kvcore_nixl.settings import NixlSettings

NIXL = pytest.importorskip("nixl_cu12", reason="pip install --no-deps nixl-cu12==1.5.1")
CHUNK = 65536


def consumer(monkeypatch: Any, peers: str) -> CacheEngine:
    monkeypatch.setenv("KVCORE_NIXL_PEERS", peers)
    monkeypatch.setenv("KVCORE_NIXL_TIMEOUT_S", "2")
    return CacheEngine(load_settings(tiers=["cpu", "nixl_peer"], chunk_size=16,
                                     tier_timeout_s=3.0))


def test_plugin_registers_everything() -> None:
    registry = get_registry(reload=True)
    assert "nixl_peer" in registry.tiers
    assert "nixl_server" in registry.attachments
    assert "transfer" in registry.benchmarks
    assert "NixlSettings" in registry.settings


def test_serving_is_an_attachment_that_starts_and_stops_with_the_engine(monkeypatch: Any) -> None:
    """KVCORE_NIXL_SERVE=1 serves the memory tier of an engine with KVCORE_TIERS=cpu (no peer
    tier); a lookup-only engine (``attachments=False``) never binds; closing the engine closes
    the server."""
    import socket

    monkeypatch.setenv("KVCORE_NIXL_SERVE", "1")
    monkeypatch.setenv("KVCORE_NIXL_LISTEN", "127.0.0.1:0")
    lookup_only = CacheEngine(load_settings(chunk_size=16), attachments=False)
    assert "nixl_server" not in lookup_only.attachments
    lookup_only.close()
    engine = CacheEngine(load_settings(chunk_size=16))
    server = engine.attachments["nixl_server"]
    assert server.memory is engine.memory and server.pending is engine.pending
    host, port = server.address.rsplit(":", 1)
    socket.create_connection((host, int(port)), timeout=2).close()  # it listens
    engine.close()
    assert len(engine.attachments) == 0
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=2).close()


def test_bad_peer_address_is_a_config_error(monkeypatch: Any) -> None:
    monkeypatch.setenv("KVCORE_NIXL_PEERS", "127.0.0.1:5600,nohost")
    with pytest.raises(ConfigError, match="KVCORE_NIXL_PEERS"):
        load_settings(NixlSettings)


def test_decode_engine_loads_what_prefill_engine_stored(
    peer_factory: Any, monkeypatch: Any
) -> None:
    producer = peer_factory(str(HERE / "_producer.py"), "6", str(CHUNK),
                            env={"KVCORE_NIXL_SERVE": "1", "KVCORE_NIXL_LISTEN": "127.0.0.1:0"})
    engine = consumer(monkeypatch, f"{closed_address()},{producer.address}")  # first peer is down
    try:
        tokens = list(range(6 * 16 + 5))
        keys = engine.keys_for(Namespace("pd-test"), tokens)
        other = engine.keys_for(Namespace("pd-test"), [7] * 32)
        found = engine.lookup(keys)
        assert found.chunks == 6 and found.by_tier == {"nixl_peer": 6}
        assert engine.lookup(other).chunks == 0
        with engine.acquire(keys) as lease:
            assert len(lease) == 6
            for key, array in zip(keys, lease.arrays()):
                assert np.array_equal(array, chunk_payload(key, CHUNK))
        assert engine.memory.contains(keys) == [True] * 6  # promoted: the next load is local
    finally:
        engine.close()


def test_decode_asking_while_prefill_still_stores_loads_everything(
    peer_factory: Any, monkeypatch: Any
) -> None:
    """The producer's store takes 3 s and is still running when we look up and load: its
    server counts the pending chunks as held and its lease waits for them to be committed."""
    producer = peer_factory(str(HERE / "_producer.py"), "4", str(CHUNK), "--slow-store", "3",
                            env={"KVCORE_NIXL_SERVE": "1", "KVCORE_NIXL_LISTEN": "127.0.0.1:0",
                                 "KVCORE_NIXL_STORE_WAIT_S": "8"})
    monkeypatch.setenv("KVCORE_NIXL_PEERS", producer.address)
    monkeypatch.setenv("KVCORE_NIXL_TIMEOUT_S", "10")
    engine = CacheEngine(load_settings(tiers=["cpu", "nixl_peer"], chunk_size=16,
                                       tier_timeout_s=12.0))
    try:
        client = engine.lower[0].tier.clients[0]
        assert client.stats()["storing"] == 4  # the store is still running
        keys = engine.keys_for(Namespace("pd-test"), list(range(4 * 16 + 1)))
        assert engine.lookup(keys, prefetch=False).chunks == 4
        with engine.acquire(keys) as lease:
            assert len(lease) == 4
            for key, array in zip(keys, lease.arrays()):
                assert np.array_equal(array, chunk_payload(key, CHUNK))
    finally:
        engine.close()


def test_peer_killed_mid_transfer_engine_recomputes(peer_factory: Any, monkeypatch: Any) -> None:
    dying = peer_factory(str(HERE / "_dying_peer.py"), "--chunks", "16",
                         "--chunk-bytes", str(1 << 20))
    engine = consumer(monkeypatch, dying.address)
    agent = engine.lower[0].tier.agent
    baseline = agent.registrations
    keys = peer_keys(16)
    try:
        assert engine.lookup(keys, prefetch=False).chunks == 16
        loaded: list[int] = []

        def load() -> None:
            with engine.acquire(keys) as lease:
                loaded.append(len(lease))

        reader = threading.Thread(target=load, daemon=True)
        reader.start()
        reader.join(30)
        assert not reader.is_alive(), "acquire hung after the peer died"
        assert loaded == [0]  # every chunk is a miss: the engine recomputes
        assert engine.lookup(keys).chunks == 0
        assert engine.memory.usage().chunks == 0
    finally:
        engine.close()
    assert agent.registrations == baseline
