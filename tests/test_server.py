"""``kvcore server`` as a real process and engines as real processes: one memory tier shared by
every engine on the host, byte-identical across processes, leases that survive crashed clients,
and a server that is down, killed or restarted meaning misses, never a hang or corrupt data."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("zmq")
pytest.importorskip("msgspec")

from kvcore.config import load_settings  # noqa: E402
from kvcore.engine import CacheEngine  # noqa: E402
from kvcore.keys import Namespace  # noqa: E402
from kvcore.server import protocol as p  # noqa: E402
from kvcore.server.arena import ArenaFull, SharedArena  # noqa: E402
from kvcore.testing.server import ServerProcess as Server  # noqa: E402
from kvcore.testing.server import serving  # noqa: E402

NS = Namespace("server-test")
CHUNK = 4
CHUNK_BYTES = 1 << 16
LEASE_S = 0.6


def chunk_values(tokens: list[int]) -> list[bytes]:
    """Distinct, reproducible bytes per chunk."""
    out = []
    for i in range(len(tokens) // CHUNK):
        seed = sum(tokens[i * CHUNK : (i + 1) * CHUNK]) * 7919 + i
        out.append(np.random.default_rng(seed).integers(0, 256, CHUNK_BYTES,
                                                        dtype=np.uint8).tobytes())
    return out


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    srv = Server(tmp_path, budget=32 * CHUNK_BYTES, lease_s=LEASE_S)
    yield from serving(srv, monkeypatch.setenv)


def engine() -> CacheEngine:
    return CacheEngine(load_settings(chunk_size=CHUNK, cpu_size=32 * CHUNK_BYTES))


CLIENT = textwrap.dedent('''
    """An engine in another process, attached to the server; acts on JSON lines from stdin."""
    import json, sys
    import numpy as np
    from kvcore.config import load_settings
    from kvcore.engine import CacheEngine
    from kvcore.keys import Namespace

    engine = CacheEngine(load_settings(chunk_size=4, cpu_size=1 << 21))
    ns = Namespace("server-test")
    print(json.dumps({"memory": type(engine.memory).__name__}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        keys = engine.keys_for(ns, cmd["tokens"])
        if cmd["op"] == "store":
            values = [bytes.fromhex(v) for v in cmd["values"]]
            engine.store_buffers(keys, values).wait(10)
            answer = {"stored": sum(engine.memory.contains(keys))}
        elif cmd["op"] == "half-store":  # reserve and half-write the first chunk, then hang
            buf = engine.memory.reserve(keys[0], cmd["nbytes"])
            buf[: cmd["nbytes"] // 2] = 7
            answer = {"reserved": buf is not None}
        elif cmd["op"] == "hold":  # acquire the chunks and keep them
            views = engine.memory.acquire(keys)
            answer = {"held": sum(v is not None for v in views)}
        print(json.dumps(answer), flush=True)
''')


class Client:
    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        script = tmp / "client.py"
        script.write_text(CLIENT)
        self.proc = subprocess.Popen([sys.executable, str(script)], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert json.loads(self.read())["memory"] == "ServerTier"

    def read(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline()

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.read())

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def client_env(srv: Server) -> dict[str, str]:
    return {**os.environ, **srv.client_env()}


def wait_for(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def test_a_prefix_stored_by_one_process_loads_byte_identical_in_another(
        server: Server, tmp_path: Path) -> None:
    tokens = list(range(100, 116))  # 4 chunks
    values = chunk_values(tokens)
    writer = Client(tmp_path, client_env(server))
    try:
        assert writer.ask(op="store", tokens=tokens, values=[v.hex() for v in values]) == {
            "stored": 4}
    finally:
        writer.kill()  # its engine is gone: the chunks stay in the server
    reader = engine()
    try:
        assert type(reader.memory).__name__ == "ServerTier"
        keys = reader.keys_for(NS, tokens)
        assert reader.lookup(keys).tokens == 16
        views = reader.memory.acquire(keys)
        assert [bytes(v) if v is not None else None for v in views] == values
        reader.memory.release(views)
        usage = reader.memory.usage()
        assert (usage.chunks, usage.used_bytes) == (4, 4 * CHUNK_BYTES)
    finally:
        reader.close()


def test_a_client_killed_mid_store_leaves_nothing_visible(server: Server,
                                                          tmp_path: Path) -> None:
    tokens = list(range(200, 204))
    victim = Client(tmp_path, client_env(server))
    assert victim.ask(op="half-store", tokens=tokens, nbytes=CHUNK_BYTES) == {"reserved": True}
    observer = engine()
    try:
        key = observer.keys_for(NS, tokens)[0]
        assert observer.memory.contains([key]) == [False]  # reserved, not committed
        victim.kill()
        # After the lease, the reservation is gone: the budget is free, the key storable.
        assert wait_for(lambda: observer.memory.usage().used_bytes == 0)
        value = chunk_values(tokens)[0]
        assert observer.memory.put_one(key, [value])
        views = observer.memory.acquire([key])
        assert views[0] is not None and bytes(views[0]) == value
        observer.memory.release(views)
    finally:
        observer.close()


def test_a_client_killed_while_holding_chunks_unpins_them(server: Server,
                                                          tmp_path: Path) -> None:
    tokens = list(range(300, 308))
    owner = engine()
    try:
        keys = owner.keys_for(NS, tokens)
        for key, value in zip(keys, chunk_values(tokens)):
            assert owner.memory.put_one(key, [value])
        holder = Client(tmp_path, client_env(server))
        assert holder.ask(op="hold", tokens=tokens) == {"held": 2}
        assert owner.memory.delete(keys) == 0  # held by the other process: not deletable
        holder.kill()
        assert wait_for(lambda: owner.memory.delete(keys) == 2)
    finally:
        owner.close()


def test_a_dead_server_is_a_miss_then_a_restart_is_reconnected(server: Server) -> None:
    tokens = list(range(400, 408))
    values = chunk_values(tokens)
    client = engine()
    try:
        keys = client.keys_for(NS, tokens)
        client.store_buffers(keys, values).wait(10)
        assert client.lookup(keys).tokens == 8
        server.kill()  # SIGKILL: no goodbye
        started = time.monotonic()
        assert client.lookup(keys).tokens == 0  # a miss, within the timeout
        assert client.memory.reserve(keys[0], CHUNK_BYTES) is None  # a store is dropped
        assert time.monotonic() - started < 5.0
        server.start()  # a new epoch, a new arena: the old chunks are gone, nothing corrupt
        assert wait_for(client.memory.ping)  # type: ignore[attr-defined]  # reconnected
        assert client.lookup(keys).tokens == 0
        client.store_buffers(keys, values).wait(10)
        assert wait_for(lambda: client.lookup(keys).tokens == 8)
        views = client.memory.acquire(keys)
        assert [bytes(v) for v in views if v is not None] == values
        client.memory.release(views)
    finally:
        client.close()


def test_socket_and_shared_memory_are_the_users_only(server: Server, tmp_path: Path) -> None:
    socket_path = Path(server.url.removeprefix("unix://"))
    assert stat.S_IMODE(socket_path.stat().st_mode) & 0o077 == 0
    (arena,) = tmp_path.glob("kvcore-*")
    assert stat.S_IMODE(arena.stat().st_mode) == 0o600
    assert server.stop() == 0  # SIGTERM: a clean exit removes both
    assert not socket_path.exists() and not arena.exists()


def test_garbage_on_the_socket_is_refused_and_the_server_keeps_serving(
        server: Server) -> None:
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(p.zmq_address(server.url))
    try:
        sock.send(b"one frame, no sequence number")  # dropped: not a kvcore request
        answers = []
        for seq, (payload, answered) in enumerate([
                (b"\xff\x00garbage", True), (p.encode(p.Contains([b"short"])), True),
                (p.encode(p.Hello(1)), True), (p.encode(p.Contains([b"short"])), True),
                (p.encode(p.Commit(b"k" * 24)), False),  # one-way: refused, no answer
                (p.encode(p.Acquire([b"k" * 24])), True)], start=1):
            sock.send_multipart([seq.to_bytes(8, "big"), payload])
            if not answered:
                continue
            assert sock.poll(5000)
            answered_seq, reply = sock.recv_multipart()
            assert int.from_bytes(answered_seq, "big") == seq
            answers.append(p.reply_decoder.decode(reply))
        assert isinstance(answers[0], p.Failed) and "malformed" in answers[0].error
        assert isinstance(answers[1], p.Failed) and "Hello" in answers[1].error
        assert isinstance(answers[2], p.Welcome)
        assert isinstance(answers[3], p.Failed) and "24 bytes" in answers[3].error
        assert answers[4] == p.Extents([-1], [0])  # the commit made nothing visible
        assert not sock.poll(200)  # and nothing more came back
    finally:
        sock.close()
    checker = engine()
    try:
        assert checker.memory.usage().budget_bytes == 32 * CHUNK_BYTES
    finally:
        checker.close()


def test_the_arena_allocates_first_fit_and_merges_what_is_freed(tmp_path: Path) -> None:
    arena = SharedArena(tmp_path / "arena", 16 * 4096, create=True)
    try:
        a, b, c = (arena.allocate(4096 * n) for n in (4, 4, 8))
        with pytest.raises(ArenaFull):
            arena.allocate(1)
        arena.free(a)
        arena.free(c)
        with pytest.raises(ArenaFull):
            arena.allocate(9 * 4096)  # 4 + 8 pages free, but not adjacent
        arena.free(b)
        whole = arena.allocate(16 * 4096)  # merged back into one extent
        assert arena.offset_of(whole) == 0 and arena.free_bytes() == 0
        with pytest.raises(ValueError, match="outside"):
            arena.view(16 * 4096 - 10, 11)
    finally:
        arena.close(unlink=True)


def test_a_url_that_is_not_a_local_socket_names_the_setting() -> None:
    from kvcore.config import ConfigError
    from kvcore.server.settings import ServerSettings

    with pytest.raises(ConfigError, match="KVCORE_SERVER_URL='tcp://10.0.0.1:5555': give unix"):
        load_settings(ServerSettings, url="tcp://10.0.0.1:5555")


def test_a_stalled_server_keeps_a_clients_holds_and_late_grants_are_given_back(
        server: Server) -> None:
    """A call that times out (the server stopped for longer than the client waits, and longer
    than the lease) neither ends the client's lease nor leaks what the late reply granted."""
    tokens = list(range(500, 508))
    owner, other = engine(), engine()
    try:
        keys = owner.keys_for(NS, tokens)
        for key, value in zip(keys, chunk_values(tokens)):
            assert owner.memory.put_one(key, [value])
        held = owner.memory.acquire(keys[:1])
        assert held[0] is not None
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        try:
            assert owner.memory.acquire(keys[1:]) == [None]  # timed out: a miss
            time.sleep(LEASE_S * 2)
        finally:
            server.proc.send_signal(signal.SIGCONT)
        assert wait_for(owner.memory.ping)  # type: ignore[attr-defined]
        # The late grant of keys[1] was given back; the hold on keys[0] stands.
        assert wait_for(lambda: other.memory.delete(keys[1:]) == 1)
        assert other.memory.delete(keys[:1]) == 0
        assert bytes(held[0]) == chunk_values(tokens)[0]
        owner.memory.release(held)
        assert wait_for(lambda: other.memory.delete(keys[:1]) == 1)
    finally:
        owner.close()
        other.close()


def test_a_stopped_client_keeps_its_reservation_until_it_is_gone(server: Server,
                                                                 tmp_path: Path) -> None:
    """A client that is alive but silent (SIGSTOP) may still write into what it reserved: the
    server keeps the reservation past the lease, and frees it once the process is gone."""
    tokens = list(range(600, 604))
    frozen = Client(tmp_path, client_env(server))
    assert frozen.ask(op="half-store", tokens=tokens, nbytes=CHUNK_BYTES) == {"reserved": True}
    observer = engine()
    try:
        frozen.proc.send_signal(signal.SIGSTOP)
        time.sleep(LEASE_S * 3)
        assert observer.memory.usage().used_bytes == CHUNK_BYTES  # still reserved
        frozen.kill()
        assert wait_for(lambda: observer.memory.usage().used_bytes == 0)
    finally:
        observer.close()


def test_an_engine_with_a_bad_server_url_names_the_setting(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from kvcore.config import ConfigError

    monkeypatch.setenv("KVCORE_SERVER_URL", "http://localhost:1234")
    with pytest.raises(ConfigError, match="KVCORE_SERVER_URL"):
        engine()


# -- the server as the host's instance ---------------------------------------------------------


def test_arena_files_of_dead_servers_are_removed_at_start(tmp_path: Path) -> None:
    """A SIGKILLed server leaves its arena file; the next server removes it (no server holds
    its lock), and leaves alone a live server's arena and one that is just being created."""
    first = Server(tmp_path / "a", budget=4 * CHUNK_BYTES, shm_dir=tmp_path).start()
    first.kill()
    left = list(tmp_path.glob(f"kvcore-{os.getuid()}-*"))
    assert len(left) == 1
    old = time.time() - 3600
    os.utime(left[0], (old, old))
    live = SharedArena(tmp_path / f"kvcore-{os.getuid()}-live", 1 << 16, create=True, lock=True)
    os.utime(live.path, (old, old))
    young = tmp_path / f"kvcore-{os.getuid()}-young"
    young.write_bytes(b"")
    second = Server(tmp_path / "b", budget=4 * CHUNK_BYTES, shm_dir=tmp_path).start()
    try:
        names = {p.name for p in tmp_path.glob(f"kvcore-{os.getuid()}-*")}
        assert left[0].name not in names
        assert {live.path.name, young.name} <= names
        assert len(names) == 3  # and the second server's own
    finally:
        second.stop()
        live.close(unlink=True)


def test_the_server_is_the_hosts_instance_at_the_controller(
        server_with_controller: tuple[Server, str]) -> None:
    """The server reports its tiers as one instance, role ``cache-server``, listing the engines
    attached; an engine behind it reports no chunks of its own but is counted as holding what
    the server holds, so routing by served model name picks it (never the server)."""
    from kvcore.control.client import ControllerClient

    srv, url = server_with_controller
    client = ControllerClient(url, TOKEN)
    tokens = list(range(7000, 7000 + 4 * CHUNK))
    with engine() as e:
        e.declare_namespace(NS, served_as=["chat"])
        e.store_buffers(e.keys_for(NS, tokens), chunk_values(tokens)).wait(10)

        def seen() -> dict[str, dict[str, Any]] | None:
            found = {i["id"]: i for i in client.instances()}
            cache, mine = found.get("host-cache"), found.get("engine-a")
            ready = (cache is not None and mine is not None and cache["attached"] == ["engine-a"]
                     and cache["chunks_indexed"].get("cpu") == 4
                     and os.getpid() in [c["pid"] for c in cache["clients"]])
            return found if ready else None

        found = wait_for(seen, timeout=20)
        assert found, client.instances()
        cache, mine = found["host-cache"], found["engine-a"]
        assert cache["role"] == "cache-server" and mine["role"] == "engine"
        assert mine["cache_server"] == "host-cache"
        assert list(mine["tiers"]) == ["server"] and not any(mine["chunks_indexed"].values())

        routed = client.route(None, tokens, model="chat")
        assert (routed["instance"], routed["tokens"]) == ("engine-a", 4 * CHUNK)
        assert client.lookup(None, tokens, model="chat") == {"engine-a": 4 * CHUNK}
        # The engine told the server its namespaces: the server is listed as their holder.
        listed = wait_for(lambda: [n for n in client.namespaces(model="chat")
                                   if any(h["instance"] == "host-cache"
                                          for h in n["instances"])], timeout=10)
        assert listed and listed[0]["id"] == NS.digest.hex()
        holders = {h["instance"]: h["chunks_by_tier"] for h in listed[0]["instances"]}
        assert holders["host-cache"] == {"cpu": 4}


TOKEN = "server-test-token"


@pytest.fixture
def server_with_controller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                           ) -> Iterator[tuple[Server, str]]:
    pytest.importorskip("fastapi")
    from kvcore.testing.controller import start_controller, stop_process

    proc, url = start_controller(TOKEN)
    reporting = {"KVCORE_CONTROLLER_URL": url, "KVCORE_CONTROLLER_TOKEN": TOKEN,
                 "KVCORE_CONTROLLER_HEARTBEAT_S": "0.3", "KVCORE_CONTROLLER_FLUSH_S": "0.05"}
    srv = Server(tmp_path, budget=32 * CHUNK_BYTES, lease_s=LEASE_S,
                 env={**reporting, "KVCORE_CONTROLLER_INSTANCE_ID": "host-cache",
                      "KVCORE_CHUNK_SIZE": str(CHUNK)}).start()
    for name, value in {**srv.client_env(), **reporting,
                        "KVCORE_CONTROLLER_INSTANCE_ID": "engine-a"}.items():
        monkeypatch.setenv(name, value)
    try:
        yield srv, url
    finally:
        if srv.running:
            srv.kill()
        stop_process(proc)
