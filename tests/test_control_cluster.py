"""Several real kvcore instances (separate processes, reporting on) and a real controller
process (``kvcore controller``): what the controller says matches what each instance holds,
and its mutations take effect in the instances."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from kvcore.control.client import ControllerClient, ControllerError, HttpJson  # noqa: E402
from kvcore.keys import Namespace  # noqa: E402
from kvcore.testing.controller import start_controller as controller_process  # noqa: E402
from kvcore.testing.controller import stop_process  # noqa: E402
from kvcore.testing.ports import closed_address  # noqa: E402

TOKEN = "cluster-test-token"
CHUNK = 4
CHUNK_BYTES = 64
NS = Namespace("control-test-model")
PROMPT = list(range(1000, 1016))  # 4 chunks
SHORT = PROMPT[:8]  # its first 2 chunks
OTHER = list(range(5000, 5012))  # 3 unrelated chunks

INSTANCE = textwrap.dedent('''
    """A kvcore instance that reports to the controller; driven by JSON lines on stdin."""
    import hashlib, json, sys, threading
    sys.modules["torch"] = None  # plain numpy buffers: no seconds-long torch import per instance
    from kvcore.config import load_settings
    from kvcore.control import attach
    from kvcore.engine import CacheEngine
    from kvcore.hookspecs import hookimpl
    from kvcore.interfaces import Tier, TierUsage
    from kvcore.keys import Namespace
    from kvcore.plugins import PluginRegistry

    class DictTier(Tier):
        """A lower tier in a dict that reports admissions and evictions."""
        def __init__(self, context):
            self.data, self.lock, self.notify = {}, threading.Lock(), context.notify
        def contains(self, keys):
            with self.lock:
                return [k in self.data for k in keys]
        def get(self, keys):
            with self.lock:
                return [self.data.get(k) for k in keys]
        def put(self, items):
            with self.lock:
                for key, parts in items:
                    self.data[key] = b"".join(bytes(p) for p in parts)
            self.notify(self.name, "admit", [k for k, _ in items])
            return [True] * len(items)
        def delete(self, keys):
            with self.lock:
                gone = [k for k in keys if self.data.pop(k, None) is not None]
            self.notify(self.name, "evict", gone)
            return len(gone)
        def usage(self):
            with self.lock:
                return TierUsage(sum(map(len, self.data.values())), 1 << 30, len(self.data))
        def iter_keys(self):
            with self.lock:
                return iter(list(self.data))

    class DiskPlugin:
        @hookimpl
        def kvcore_register_tiers(self, register):
            register("disk", DictTier)

    registry = PluginRegistry().load(allow=[])
    registry.register_module(DiskPlugin(), name="test-disk")
    engine = CacheEngine(load_settings(), registry=registry)
    reporter = attach(engine)
    ns = Namespace(sys.argv[1])
    nbytes = int(sys.argv[2])

    def payload(key):
        return (hashlib.sha256(key).digest() * (nbytes // 32 + 1))[:nbytes]

    def leading(tier, keys):
        n = 0
        for hit in tier.contains(keys):
            if not hit:
                break
            n += 1
        return n * engine.chunk_size

    def handle(req):
        keys = engine.keys_for(ns, req.get("tokens", []))
        op = req["op"]
        if op == "store":
            stored = engine.store_buffers(keys, [payload(k) for k in keys]).wait(30)
            engine.flush()
            return {"stored": stored}
        if op == "holds":
            return {t.name: leading(t, keys) for t in engine.tiers}
        if op == "pinned":
            return {"pinned": [engine.memory.is_pinned(k) for k in keys]}
        if op == "intact":
            values = engine.memory.get(keys)
            return {"intact": [v is not None and bytes(v) == payload(k)
                               for k, v in zip(keys, values)]}
        if op == "lookup":
            found = engine.lookup(keys, request_id=req["id"], tokens=req.get("tokens", []))
            return {"tokens": found.tokens}
        if op == "delete":
            return {"removed": engine.delete(keys[req.get("first", 0):])}
        if op == "registered":
            return {"registered": reporter.registered}
        if op == "stats":
            return engine.stats()
        raise ValueError(op)

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "quit":
            break
        print(json.dumps(handle(req)), flush=True)
    reporter.close()
    engine.close()
''')


def wait_for(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """Poll ``check`` until it returns something true (event delivery is asynchronous)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


class Instance:
    """A kvcore instance process."""

    def __init__(self, script: Path, url: str, instance_id: str, cpu_chunks: int = 64) -> None:
        self.id = instance_id
        env = {**os.environ, **{
            "KVCORE_CHUNK_SIZE": str(CHUNK), "KVCORE_CPU_SIZE": str(cpu_chunks * CHUNK_BYTES),
            "KVCORE_TIERS": "cpu,disk", "KVCORE_EVICTION": "lru", "KVCORE_CONTROLLER_URL": url,
            "KVCORE_CONTROLLER_TOKEN": TOKEN, "KVCORE_CONTROLLER_INSTANCE_ID": instance_id,
            "KVCORE_CONTROLLER_HEARTBEAT_S": "0.2", "KVCORE_CONTROLLER_FLUSH_S": "0.02",
            "KVCORE_CONTROLLER_POLL_S": "2", "KVCORE_CONTROLLER_TIMEOUT_S": "1"}}
        self.proc = subprocess.Popen(
            [sys.executable, str(script), NS.model, str(CHUNK_BYTES)], env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ready(self) -> Instance:
        assert self._read()["ready"]
        return self

    def _read(self, timeout: float = 30.0) -> Any:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise AssertionError(f"instance {self.id} did not answer")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"instance {self.id} exited ({self.proc.poll()})")
        return json.loads(line)

    def ask(self, op: str, tokens: list[int] | None = None, **extra: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, "tokens": tokens or [], **extra}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def start_controller(port: int = 0, expiry_s: float = 1.5) -> tuple[subprocess.Popen, str]:
    return controller_process(TOKEN, port, expiry_s=str(expiry_s), poll_s="2",
                              command_timeout_s="10")


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "instance.py"
    path.write_text(INSTANCE)
    return path


@pytest.fixture
def controller() -> Iterator[str]:
    proc, url = start_controller()
    yield url
    stop_process(proc)


@pytest.fixture
def spawn(script: Path, controller: str) -> Iterator[Callable[..., list[Instance]]]:
    """``spawn("a", "b")`` starts instances in parallel and returns them when ready."""
    started: list[Instance] = []

    def make(*ids: str, cpu_chunks: int = 64) -> list[Instance]:
        new = [Instance(script, controller, i, cpu_chunks) for i in ids]
        started.extend(new)
        return [inst.ready() for inst in new]

    yield make
    for inst in started:
        inst.kill()


@pytest.fixture
def client(controller: str) -> ControllerClient:
    return ControllerClient(controller, TOKEN, timeout_s=20)


def index_of(client: ControllerClient, tokens: list[int]) -> dict[str, dict[str, int]]:
    return {row["instance"]: row["by_tier"] for row in client.lookup_detail(NS, tokens)}


def agrees(client: ControllerClient, instances: list[Instance], tokens: list[int]) -> Any:
    """The controller's per-tier answer equals each instance's own, for every instance."""
    truth = {inst.id: inst.ask("holds", tokens) for inst in instances}
    seen = index_of(client, tokens)
    return truth if seen == truth else False


def test_registration_lookup_and_route(spawn: Callable[..., list[Instance]],
                                       client: ControllerClient) -> None:
    a, b, c = spawn("a", "b", "c")
    assert a.ask("store", PROMPT)["stored"] == 4
    assert b.ask("store", SHORT)["stored"] == 2
    assert c.ask("store", OTHER)["stored"] == 3
    wait_for(lambda: {i["id"] for i in client.instances()} == {"a", "b", "c"}, "registration")
    for tokens in (PROMPT, OTHER, PROMPT + [1]):
        truth = wait_for(lambda: agrees(client, [a, b, c], tokens), f"index of {tokens[:2]}")
        assert any(v for t in truth.values() for v in t.values()) or tokens is not PROMPT
    assert client.lookup(NS, PROMPT) == {"a": 16, "b": 8, "c": 0}
    assert client.route(NS, PROMPT)["instance"] == "a"
    assert client.route(NS, SHORT + [7, 7, 7, 7])["tokens"] == 8
    assert client.route(NS, OTHER)["instance"] == "c"
    assert client.route(Namespace("other-model"), PROMPT)["tokens"] == 0
    usage = {i["id"]: i for i in client.instances()}
    wait_for(lambda: {i["id"]: i["tiers"]["cpu"]["chunks"] for i in client.instances()}
             == {"a": 4, "b": 2, "c": 3}, "tier usage from heartbeats")
    assert usage["a"]["chunk_size"] == CHUNK
    text = client.metrics_text()
    assert 'kvcore_tier_budget_bytes{instance="a",name="a",tier="cpu"} 4096' in text


def test_clear_by_instance_tier_and_namespace(spawn: Callable[..., list[Instance]],
                                              client: ControllerClient) -> None:
    a, b = spawn("a", "b")
    a.ask("store", PROMPT)
    b.ask("store", PROMPT)
    wait_for(lambda: agrees(client, [a, b], PROMPT), "index")
    (result,) = client.clear(NS, instance="a", tier="cpu")
    assert result["ok"] and result["result"]["removed"] == 4
    assert a.ask("holds", PROMPT) == {"cpu": 0, "disk": 16}
    assert b.ask("holds", PROMPT) == {"cpu": 16, "disk": 16}
    assert wait_for(lambda: agrees(client, [a, b], PROMPT), "index after clear")
    client.clear(Namespace("other-model"))
    assert b.ask("holds", PROMPT) == {"cpu": 16, "disk": 16}
    results = client.clear(NS)
    assert {r["instance"] for r in results if r["ok"]} == {"a", "b"}
    for inst in (a, b):
        assert inst.ask("holds", PROMPT) == {"cpu": 0, "disk": 0}
    assert client.lookup(NS, PROMPT) == {"a": 0, "b": 0}


def test_pinned_prefix_survives_pressure(spawn: Callable[..., list[Instance]],
                                         client: ControllerClient) -> None:
    (a,) = spawn("a", cpu_chunks=8)
    a.ask("store", PROMPT)
    wait_for(lambda: agrees(client, [a], PROMPT), "index")
    (result,) = client.pin(NS, PROMPT)
    assert result["ok"] and result["result"]["chunks"] >= 4
    assert a.ask("pinned", PROMPT)["pinned"] == [True] * 4
    pressure = [list(range(n, n + 2 * CHUNK)) for n in range(20000, 21000, 50)]
    for prompt in pressure:  # 40 chunks through an 8-chunk tier
        assert a.ask("store", prompt)["stored"] == 2
    assert a.ask("holds", PROMPT)["cpu"] == 16
    assert a.ask("intact", PROMPT)["intact"] == [True] * 4
    assert a.ask("holds", pressure[0])["cpu"] == 0  # the rest was evicted
    assert a.ask("holds", pressure[-1])["cpu"] == 2 * CHUNK
    wait_for(lambda: agrees(client, [a], PROMPT), "index after pressure")
    assert client.lookup_detail(NS, PROMPT)[0]["by_tier"]["cpu"] == 16
    client.unpin(NS, PROMPT)
    assert a.ask("pinned", PROMPT)["pinned"] == [False] * 4
    for prompt in pressure[:8]:
        a.ask("store", prompt)
    assert a.ask("holds", PROMPT)["cpu"] == 0
    wait_for(lambda: index_of(client, PROMPT)["a"]["cpu"] == 0, "index after unpin")


def test_move_between_tiers_and_instances(spawn: Callable[..., list[Instance]],
                                          client: ControllerClient) -> None:
    a, b = spawn("a", "b")
    a.ask("store", PROMPT)
    wait_for(lambda: agrees(client, [a, b], PROMPT), "index")
    client.clear(NS, instance="a", tier="cpu")
    assert a.ask("holds", PROMPT) == {"cpu": 0, "disk": 16}
    moved = client.move(NS, PROMPT, source=("a", "disk"), target=("a", "cpu"))
    assert moved["chunks"] == 4
    assert a.ask("holds", PROMPT) == {"cpu": 16, "disk": 16}
    assert a.ask("intact", PROMPT)["intact"] == [True] * 4
    moved = client.move(NS, PROMPT, source=("a", "cpu"), target=("b", "cpu"), mode="move")
    assert moved == {"chunks": 4, "tokens": 16, "mode": "move"}
    assert b.ask("intact", PROMPT)["intact"] == [True] * 4
    assert a.ask("holds", PROMPT)["cpu"] == 0
    wait_for(lambda: agrees(client, [a, b], PROMPT), "index after move")
    assert client.route(NS, PROMPT)["instance"] == "b"
    with pytest.raises(ControllerError) as refused:
        client.move(NS, OTHER, source=("a", "cpu"), target=("b", "cpu"))
    assert refused.value.status == 409 and "not cached" in refused.value.message


def test_killed_instance_leaves_the_index(spawn: Callable[..., list[Instance]],
                                          client: ControllerClient) -> None:
    a, b = spawn("a", "b")
    a.ask("store", PROMPT)
    b.ask("store", SHORT)
    wait_for(lambda: client.route(NS, PROMPT)["instance"] == "a", "route to a")
    a.kill()
    wait_for(lambda: [i["id"] for i in client.instances()] == ["b"], "expiry of a")
    assert client.route(NS, PROMPT) == {"instance": "b", "name": "b", "tokens": 8,
                                        "namespace": NS.digest.hex()}
    assert "instance=\"a\"" not in client.metrics_text()


def test_mutations_refused_without_the_right_token(spawn: Callable[..., list[Instance]],
                                                   controller: str) -> None:
    (a,) = spawn("a")
    a.ask("store", PROMPT)
    for token in ("", "not-the-token"):
        http = HttpJson(controller, token)
        status, body = http.call("POST", "/v1/clear", {})
        assert status == (401 if not token else 403), body
        status, _ = http.call("POST", "/v1/instances", {"id": "x", "chunk_size": 4,
                                                        "tiers": ["cpu"]})
        assert status == (401 if not token else 403)
    assert a.ask("holds", PROMPT)["cpu"] == 16
    with pytest.raises(ControllerError) as refused:
        ControllerClient(controller, "wrong").pin(NS, PROMPT)
    assert refused.value.status == 403
    assert a.ask("pinned", PROMPT)["pinned"] == [False] * 4


def test_instance_outlives_the_controller_and_registers_again(script: Path) -> None:
    proc, url = start_controller()
    port = int(url.rsplit(":", 1)[1])
    a = Instance(script, url, "a").ready()
    try:
        a.ask("store", SHORT)
        client = ControllerClient(url, TOKEN)
        wait_for(lambda: client.lookup(NS, PROMPT) == {"a": 8}, "first index")
        stop_process(proc)
        wait_for(lambda: not a.ask("registered")["registered"], "loss noticed")
        assert a.ask("store", PROMPT)["stored"] == 2  # serving goes on without the controller
        assert a.ask("holds", PROMPT)["cpu"] == 16
        proc, url = start_controller(port)
        wait_for(lambda: a.ask("registered")["registered"], "registered again")
        wait_for(lambda: client.lookup(NS, PROMPT) == {"a": 16}, "index rebuilt from snapshot")
    finally:
        a.kill()
        stop_process(proc)


def test_a_wrong_token_or_url_is_said_once_and_the_engine_serves(
    controller: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """A reporter whose token the (real) controller refuses, and one whose URL answers nothing,
    each log one warning naming the setting, however often they retry; the engine serves."""
    import logging

    from kvcore.config import load_settings
    from kvcore.control import attach
    from kvcore.engine import CacheEngine

    closed = f"http://{closed_address()}"
    with caplog.at_level(logging.WARNING, logger="kvcore.control.reporter"):
        engines = [CacheEngine(load_settings(chunk_size=4)) for _ in range(2)]
        reporters = [attach(engines[0], url=controller, token="wrong-token", heartbeat_s=0.1,
                            flush_s=0.05),
                     attach(engines[1], url=closed, token=TOKEN, heartbeat_s=0.1, flush_s=0.05,
                            timeout_s=0.2)]
        try:
            keys = engines[0].keys_for(NS, PROMPT)
            assert engines[0].store_buffers(keys, [bytes(16)] * 4).wait(5) == 4
            time.sleep(1.5)  # many retries
            assert not any(r is not None and r.registered for r in reporters)
            assert engines[0].lookup(keys).chunks == 4
        finally:
            for engine in engines:
                engine.close()
    lines = [r.getMessage() for r in caplog.records if "cannot register" in r.getMessage()]
    assert len([m for m in lines if "refused KVCORE_CONTROLLER_TOKEN" in m]) == 1, lines
    assert len([m for m in lines if "no answer from KVCORE_CONTROLLER_URL" in m]) == 1, lines


def test_requests_say_why_each_missed(spawn: Callable[..., list[Instance]],
                                      client: ControllerClient) -> None:
    """``/v1/requests``: each instance's record of a request, with the miss reason, through a
    real controller; deletes are counted by reason in the instances' Prometheus metrics."""
    a, b = spawn("a", "b")
    assert a.ask("store", PROMPT)["stored"] == 4
    assert a.ask("delete", PROMPT, first=2)["removed"] >= 2  # chunks 2 and 3, every tier
    assert a.ask("lookup", PROMPT, id="req-1")["tokens"] == 8
    assert b.ask("lookup", OTHER, id="req-2")["tokens"] == 0
    wait_for(lambda: {i["id"] for i in client.instances()} == {"a", "b"}, "registration")
    (record,) = client.request("req-1")
    assert record["instance"] == "a"
    assert (record["tokens_asked"], record["tokens_hit"]) == (16, 8)
    assert record["hit_by_tier"] == {"cpu": 8}
    assert record["miss"]["reason"] == "deleted" and record["miss"]["chunk"] == 2
    (other,) = client.request("req-2")
    assert other["instance"] == "b" and other["miss"]["reason"] == "never_stored"
    assert {r["id"] for r in client.requests(limit=5)} == {"req-1", "req-2"}
    assert [r["id"] for r in client.requests(instance="b")] == ["req-2"]
    with pytest.raises(ControllerError) as missing:
        client.request("no-such-request")
    assert missing.value.status == 404 and "no instance remembers" in str(missing.value)
    counted = ('kvcore_request_misses_total{instance="a",name="a",reason="deleted"} 1',
               'kvcore_request_misses_total{instance="b",name="b",reason="never_stored"} 1')
    # each instance's counters arrive with its own next heartbeat: wait for both
    wait_for(lambda: all(line in client.metrics_text() for line in counted),
             "miss counters of both instances in the heartbeat stats")
