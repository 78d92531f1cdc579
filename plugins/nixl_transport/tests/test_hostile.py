"""Issue 17: hostile peers on the NIXL side channel (real NIXL agents, UCX over loopback).

Before: anyone who could connect took 3,000 leases in under 8 s (the owner then stored 0 of 20
new chunks) and ended other peers' leases; 1,500 connections made 1,505 threads; 12 connections
buffered +784 MiB; a 500k-deep JSON nesting raised an uncaught RecursionError. Every loop here
is bounded in count and time; figures are printed (``pytest -s``).
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from kvcore.eviction.lru import LRUPolicy
from kvcore.tiers.cpu import CpuTier
from kvcore_nixl import wire
from kvcore_nixl.agent import Agent
from kvcore_nixl.client import PeerClient, PeerError
from kvcore_nixl.peer import chunk_payload, peer_keys
from kvcore_nixl.server import ChunkServer, Limits

pytest.importorskip("nixl_cu12", reason="pip install --no-deps nixl-cu12==1.5.1")
SECRET = b"one-deployment-secret"
CHUNK = 65536
CHUNKS = 16
MiB = 1024**2


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@pytest.fixture(scope="module")
def agents() -> tuple[Agent, Agent]:
    return Agent(), Agent()


def _tier(keys: list[bytes]) -> CpuTier:
    tier = CpuTier(4 * len(keys) * CHUNK, LRUPolicy(),
                   allocate=lambda n: np.empty(n, dtype=np.uint8))
    for i, key in enumerate(keys):
        tier.put_one(key, [chunk_payload(key, CHUNK)], keys[i - 1] if i else None)
    return tier


@pytest.fixture
def served(agents) -> Iterator[tuple[ChunkServer, list[bytes]]]:
    keys = peer_keys(CHUNKS, "hostile")
    server = ChunkServer(_tier(keys), agents[0], "127.0.0.1:0", lease_timeout_s=30.0,
                         secret=SECRET, limits=Limits(max_connections=32, frame_timeout_s=0.5,
                                                      idle_timeout_s=5.0, max_leases_per_peer=4))
    yield server, keys
    server.close()


def _connect(server: ChunkServer) -> socket.socket:
    host, port = server.address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=2.0)
    return sock


def _closed(sock: socket.socket, within_s: float = 2.0) -> bool:
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except OSError:
        return False


def _valid(key: bytes, view) -> bool:
    return view is not None and bytes(view) == chunk_payload(key, CHUNK).tobytes()


def test_only_holders_of_the_secret_lease_or_read(served, agents, figure) -> None:
    server, keys = served
    attempts = 0
    deadline = time.monotonic() + 5.0
    while attempts < 300 and time.monotonic() < deadline:  # raw clients, no secret
        with _connect(server) as sock:
            try:
                wire.send(sock, {"op": "lease"}, b"".join(keys))  # straight to a lease
                wire.recv(sock)
            except (OSError, wire.WireError):
                pass
        with _connect(server) as sock:
            try:  # a hello, then a lease without answering the challenge
                wire.send(sock, {"op": "hello", "nonce": "00" * 32, "agent": "x"})
                wire.recv(sock)
                wire.send(sock, {"op": "lease"}, b"".join(keys))
                wire.recv(sock)
            except (OSError, wire.WireError):
                pass
        attempts += 2
    taken = server.counters
    for secret in (None, b"wrong-secret"):
        client = PeerClient(server.address, agents[1], timeout_s=2.0, secret=secret)
        try:
            assert client.read(keys[:4]) == [None] * 4
        finally:
            client.close()
    figure(f"{attempts} unauthenticated lease attempts (+2 clients without/with a wrong "
          f"secret): {server.active_leases()} leases taken, {taken['auth_failures']} refused")
    assert server.active_leases() == 0
    assert server.agent.registrations == 0
    good = PeerClient(server.address, agents[1], timeout_s=5.0, secret=SECRET)
    try:
        values = good.read(keys[:4])
        assert all(_valid(k, v) for k, v in zip(keys[:4], values))
    finally:
        good.close()


def test_a_client_with_a_secret_refuses_a_server_without_one(agents) -> None:
    keys = peer_keys(2, "open")
    server = ChunkServer(_tier(keys), agents[0], "127.0.0.1:0")
    client = PeerClient(server.address, agents[1], timeout_s=2.0, secret=SECRET)
    try:
        assert client.read(keys) == [None, None]
    finally:
        client.close()
        server.close()
    with pytest.raises(ValueError, match="KVCORE_NIXL_SECRET"):
        ChunkServer(_tier(keys), agents[0], "0.0.0.0:0")  # beyond loopback, no secret


def test_leases_are_owned_and_capped(served, agents, figure) -> None:
    server, keys = served
    greedy = PeerClient(server.address, agents[1], timeout_s=5.0, secret=SECRET)
    other = PeerClient(server.address, agents[1], timeout_s=5.0, secret=SECRET)
    try:
        granted, ids = 0, []
        for _ in range(200):  # bounded
            reply, _ = greedy.request({"op": "lease"}, b"".join(keys))
            if reply.get("lease"):
                granted += 1
                ids.append(reply["lease"])
        held = sum(1 for _ in ids)
        # another peer cannot end them
        assert all(other.request({"op": "release", "lease": i})[0]["ok"] is False for i in ids)
        assert server.active_leases() == held
        # the owner still stores: 20 new chunks in its own tier
        new = peer_keys(CHUNKS + 20, "hostile")[CHUNKS:]
        stored = sum(bool(server.memory.put_one(k, [chunk_payload(k, CHUNK)], None)) for k in new)
        figure(f"one peer asked 200 leases of all {CHUNKS} chunks: {granted} granted "
              f"(cap {server.limits.max_leases_per_peer}, half the budget), another peer "
              f"ended 0 of them, the owner then stored {stored} of 20 new chunks")
        assert granted <= server.limits.max_leases_per_peer
        assert stored == 20
        greedy.close()  # its connection ends: so do its leases
        deadline = time.monotonic() + 5
        while server.active_leases() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.active_leases() == 0
    finally:
        greedy.close()
        other.close()


def test_connections_are_bounded_and_time_out(served, agents, figure) -> None:
    server, keys = served
    threads_before, rss_before = threading.active_count(), _rss_kib()
    socks = []
    for _ in range(1500):
        try:
            socks.append(_connect(server))
        except OSError:
            pass
    time.sleep(0.3)
    threads_under = threading.active_count() - threads_before
    rss_under = (_rss_kib() - rss_before) / 1024
    started = time.monotonic()
    client = PeerClient(server.address, agents[1], timeout_s=5.0, retry_s=0.0, secret=SECRET)
    served_after = None
    try:
        for _ in range(50):  # bounded: ~5 s
            values = client.read(keys[:2])
            if all(_valid(k, v) for k, v in zip(keys[:2], values)):
                served_after = time.monotonic() - started
                break
            time.sleep(0.1)
    finally:
        client.close()
        for sock in socks:
            sock.close()
    figure(f"1,500 idle connections: +{threads_under} threads, +{rss_under:.0f} MiB, "
          f"{server.counters['refused_connections']} refused at once, a real peer read after "
          f"{served_after if served_after is None else round(served_after, 2)} s")
    assert threads_under <= server.limits.max_connections + 2
    assert served_after is not None and served_after < 5


def test_large_frames_are_refused_before_they_are_buffered(served, figure) -> None:
    server, _ = served
    rss_before = _rss_kib()
    socks = []
    closed = 0
    for _ in range(12):
        sock = _connect(server)
        try:
            sock.sendall(struct.pack("<II", 16, 64 << 20) + b"{}" + b" " * 14 + b"x" * MiB)
        except (BrokenPipeError, ConnectionResetError):
            closed += 1  # refused while the client was still sending: the goal
            sock.close()
            continue
        socks.append(sock)
    closed += sum(_closed(s) for s in socks)
    grown = (_rss_kib() - rss_before) / 1024
    for sock in socks:
        sock.close()
    figure(f"12 connections announcing 64 MiB frames: {closed} closed, +{grown:.0f} MiB")
    assert closed == 12
    assert grown < 32


MALFORMED = [
    ("not JSON", struct.pack("<II", 5, 0) + b"{nope"),
    ("JSON list", struct.pack("<II", 2, 0) + b"[]"),
    ("deep nesting", struct.pack("<II", 16000, 0) + b"[" * 8000 + b"]" * 8000),
    ("500k-deep nesting", struct.pack("<II", 1_000_000, 0) + b"[" * 500_000 + b"]" * 500_000),
    ("op not a string", None),
    ("keys not a multiple of 24", None),
    ("lease id not an int", None),
    ("unknown op", None),
    ("header over the limit", struct.pack("<II", 1 << 20, 0) + b" " * 1024),
]


def _authenticated(server: ChunkServer) -> socket.socket:
    from kvcore_nixl import auth

    sock = _connect(server)
    cn = auth.nonce()
    wire.send(sock, {"op": "hello", "nonce": cn, "agent": "tester"})
    reply, _ = wire.recv(sock)
    wire.send(sock, {"op": "auth", "proof": auth.client_proof(SECRET, cn, reply["challenge"])})
    wire.recv(sock)
    return sock


def test_every_malformed_frame_closes_that_connection_and_nothing_else(
        served, agents, figure) -> None:
    server, keys = served
    errors: list[BaseException] = []
    old_hook = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)  # type: ignore[assignment]
    bystander = PeerClient(server.address, agents[1], timeout_s=5.0, secret=SECRET)
    try:
        assert bystander.contains(keys[:2]) == [True, True]
        results = {}
        for name, raw in MALFORMED:
            for pre_auth in (True, False):
                sock = _connect(server) if pre_auth else _authenticated(server)
                frames = {
                    "op not a string": lambda: wire.send(sock, {"op": 7}),
                    "keys not a multiple of 24": lambda: wire.send(sock, {"op": "lease"},
                                                                   b"x" * 25),
                    "lease id not an int": lambda: wire.send(sock, {"op": "release",
                                                                    "lease": {"a": 1}}),
                    "unknown op": lambda: wire.send(sock, {"op": "format-disk"}),
                }
                try:
                    if raw is None:
                        frames[name]()
                    else:
                        sock.sendall(raw)
                except OSError:
                    pass
                results[(name, pre_auth)] = _closed(sock)
                sock.close()
                assert bystander.contains(keys[:2]) == [True, True]  # still served
        figure(f"{len(results)} malformed frames: {sum(results.values())} closed their "
              f"connection; uncaught errors in server threads: {len(errors)}; "
              f"malformed counted {server.counters['malformed']}")
        assert all(results.values()), [k for k, v in results.items() if not v]
        assert errors == []
        values = bystander.read(keys[:2])
        assert all(_valid(k, v) for k, v in zip(keys[:2], values))
    finally:
        threading.excepthook = old_hook
        bystander.close()


def test_idle_connection_is_closed_and_the_client_reconnects(agents) -> None:
    keys = peer_keys(2, "idle")
    server = ChunkServer(_tier(keys), agents[0], "127.0.0.1:0", secret=SECRET,
                         limits=Limits(idle_timeout_s=0.3))
    client = PeerClient(server.address, agents[1], timeout_s=5.0, secret=SECRET)
    try:
        assert client.contains(keys) == [True, True]
        time.sleep(0.8)  # the server closed the idle connection meanwhile
        assert client.contains(keys) == [True, True]  # a fresh one, not a peer marked down
        values = client.read(keys)
        assert all(_valid(k, v) for k, v in zip(keys, values))
    finally:
        client.close()
        server.close()


def test_frames_of_the_protocol_stay_json(served) -> None:
    """The side channel stays data only: a header is JSON, never pickle."""
    server, _ = served
    sock = _connect(server)
    try:
        sock.sendall(struct.pack("<II", 4, 0) + b"\x80\x04N.")  # a pickle of None
        assert _closed(sock)
    finally:
        sock.close()
    json.dumps({})  # (json is what wire uses)


def test_bytes_that_do_not_match_their_frame_are_misses(served, agents, monkeypatch,
                                                       figure) -> None:
    """The lease sends each chunk's frame header (key, length, XXH3-64); a chunk whose READ
    bytes do not verify against it is a miss, the others load intact. Here the server frames
    every second chunk as another key's, and the third with a wrong length."""
    import kvcore_nixl.server as server_module

    server, keys = served
    real = server_module.frame_header
    calls = [0]

    def lying(key, view):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] % 2:
            return real(keys[-1], view)  # a foreign chunk: framed under another key
        if calls[0] == 4:
            return real(key, view[:-1])  # announced one byte short
        return real(key, view)

    monkeypatch.setattr(server_module, "frame_header", lying)
    client = PeerClient(server.address, agents[1], timeout_s=5.0, secret=SECRET)
    try:
        values = client.read(keys[:6])
        corrupt = client.corrupt
    finally:
        client.close()
    figure(f"6 chunks read, 3 framed as another key's and 1 with a wrong length: {corrupt} "
          f"refused, {sum(v is not None for v in values)} loaded intact")
    assert [v is None for v in values] == [True, False, True, True, True, False]
    assert all(_valid(k, v) for k, v in zip(keys[:6], values) if v is not None)
    assert corrupt == 4
    wait_until = time.monotonic() + 5.0
    while server.active_leases() and time.monotonic() < wait_until:
        time.sleep(0.01)
    assert server.active_leases() == 0


@pytest.mark.parametrize("entry", [
    [0, 1 << 40, "00" * 56],  # a terabyte: refused before any buffer is taken
    [0, 0, "00" * 56],  # empty
    ["0", 16, "00" * 56],  # not an int
    [0, 16],  # no frame header
    [0, 16, "00" * 8],  # a header of the wrong size
    [0, 16, "zz" * 56],  # not hex
    [-1, 16, "00" * 56],
])
def test_a_lease_answer_out_of_bounds_is_a_miss_without_allocating(agents, entry) -> None:
    """A peer's answer is checked before the client takes a receive buffer of its size."""
    client = PeerClient("127.0.0.1:1", agents[1], timeout_s=1.0, max_read_bytes=1 << 30)
    taken: list[int] = []
    client.pool.take = lambda n: taken.append(n)  # type: ignore
    try:
        with pytest.raises(PeerError, match="malformed lease entry|more than one read"):
            client._read_leased(1, [b"k" * 24], [entry], b"", time.monotonic() + 1)
    finally:
        client.close()
    assert taken == []
