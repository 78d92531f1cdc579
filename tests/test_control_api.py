"""The control API in process: auth, validation, limits, index answers, Prometheus text, and
the instance-side reporter when the controller is away."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from kvcore.config import load_settings  # noqa: E402
from kvcore.control import attach  # noqa: E402
from kvcore.control.index import GlobalIndex, InstanceState  # noqa: E402
from kvcore.control.prometheus import render_stats  # noqa: E402
from kvcore.control.reporter import Reporter  # noqa: E402
from kvcore.control.server import create_app  # noqa: E402
from kvcore.control.settings import ControllerSettings  # noqa: E402
from kvcore.engine import CacheEngine  # noqa: E402
from kvcore.keys import Namespace, chunk_keys  # noqa: E402

TOKEN = "test-token"
NS = Namespace("test-model")
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PREFIX = {"namespace": NS.digest.hex(), "tokens": list(range(12))}

MUTATIONS = [
    ("post", "/v1/clear", {}),
    ("post", "/v1/pin", PREFIX),
    ("post", "/v1/unpin", PREFIX),
    ("post", "/v1/move", {**PREFIX, "source": {"instance": "a"}, "target": {"instance": "b"}}),
    ("post", "/v1/instances", {"id": "a", "chunk_size": 4, "tiers": ["cpu"]}),
    ("delete", "/v1/instances/a", None),
    ("post", "/v1/instances/a/heartbeat", {"stats": {}}),
    ("post", "/v1/instances/a/events", {"events": []}),
    ("get", "/v1/instances/a/commands", None),
    ("post", "/v1/instances/a/commands/x/result", {"ok": True}),
]


def make_client(**overrides: object) -> TestClient:
    settings = ControllerSettings(token=TOKEN, command_timeout_s=0.2, poll_s=0.1,
                                  **overrides)  # type: ignore[arg-type]
    return TestClient(create_app(settings))


def register(client: TestClient, instance: str, keys: list[bytes], tier: str = "cpu",
             first: bool = True) -> None:
    if first:
        r = client.post("/v1/instances", json={"id": instance, "chunk_size": 4,
                                               "tiers": ["cpu", "disk"]}, headers=AUTH)
        assert r.status_code == 200, r.text
    r = client.post(f"/v1/instances/{instance}/events", headers=AUTH, json={
        "events": [{"tier": tier, "kind": "admit", "keys": [k.hex() for k in keys]}]})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("method,path,body", MUTATIONS)
def test_mutations_need_the_token(method: str, path: str, body: object) -> None:
    client = make_client()
    kwargs = {"json": body} if body is not None else {}
    missing = getattr(client, method)(path, **kwargs) if method != "delete" else client.delete(path)
    assert missing.status_code == 401
    assert "bearer token" in missing.json()["detail"]
    headers = {"Authorization": "Bearer wrong"}
    wrong = (getattr(client, method)(path, headers=headers, **kwargs) if method != "delete"
             else client.delete(path, headers=headers))
    assert wrong.status_code == 403
    basic = client.request(method.upper(), path, headers={"Authorization": f"Basic {TOKEN}"},
                           **kwargs)
    assert basic.status_code in (401, 403)


def test_reads_are_open_unless_configured() -> None:
    assert make_client().post("/v1/lookup", json=PREFIX).status_code == 200
    closed = make_client(auth_reads=True)
    assert closed.post("/v1/lookup", json=PREFIX).status_code == 401
    assert closed.post("/v1/lookup", json=PREFIX, headers=AUTH).status_code == 200
    assert closed.get("/v1/health").status_code == 200


@pytest.mark.parametrize("body,where", [
    ({"namespace": NS.digest.hex(), "tokens": [-1]}, "tokens.0"),
    ({"namespace": NS.digest.hex(), "tokens": [2**32]}, "tokens.0"),
    ({"namespace": "xyz", "tokens": [1]}, "namespace"),
    ({"namespace": {"dtype": "fp8"}, "tokens": [1]}, "namespace"),
    ({"namespace": NS.digest.hex(), "tokens": [1], "extra": 1}, "extra"),
    ({"tokens": [1]}, "namespace"),
])
def test_bad_requests_say_what_is_wrong(body: dict, where: str) -> None:
    r = make_client().post("/v1/lookup", json=body)
    assert r.status_code == 422
    assert where in r.json()["message"]


def test_bad_json_is_a_4xx() -> None:
    r = make_client().post("/v1/lookup", content=b"{not json",
                           headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert "JSON" in r.json()["message"]


def test_body_and_token_limits() -> None:
    client = make_client(max_body_bytes=1000, max_tokens=50)
    big = {"namespace": NS.digest.hex(), "tokens": list(range(400))}
    r = client.post("/v1/lookup", json=big)
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks():  # no Content-Length: counted while read
        yield b'{"namespace": "' + NS.digest.hex().encode() + b'", "tokens": ['
        for _ in range(300):
            yield b"1,"
        yield b"1]}"

    r = client.post("/v1/lookup", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    r = client.post("/v1/lookup", json={"namespace": NS.digest.hex(), "tokens": list(range(60))})
    assert r.status_code == 413 and "KVCORE_CONTROLLER_MAX_TOKENS" in r.json()["detail"]


def test_lookup_and_route_follow_the_index() -> None:
    client = make_client()
    tokens = list(range(20))
    keys = chunk_keys(NS, tokens, 4)
    register(client, "a", keys[:2])
    register(client, "b", keys[:4])
    register(client, "c", keys[1:5])  # no first chunk: holds no prefix
    register(client, "c", keys[:1], tier="disk", first=False)
    r = client.post("/v1/lookup", json={"namespace": NS.digest.hex(), "tokens": tokens})
    rows = {row["instance"]: row for row in r.json()["instances"]}
    assert rows["a"]["tokens"] == 8 and rows["b"]["tokens"] == 16
    assert rows["c"]["by_tier"] == {"cpu": 0, "disk": 4}
    assert rows["c"]["tokens"] == 20  # disk holds chunk 0, cpu chunks 1..4
    # namespace given by its fields hashes to the same id
    fields = {"model": "test-model"}
    r = client.post("/v1/route", json={"namespace": fields, "tokens": tokens})
    assert r.json()["instance"] == "c" and r.json()["tokens"] == 20
    r = client.post("/v1/route", json={"namespace": {"model": "other"}, "tokens": tokens})
    assert r.json()["tokens"] == 0
    client.post("/v1/instances/c/events", headers=AUTH, json={
        "events": [{"tier": "disk", "kind": "evict", "keys": [keys[0].hex()]}]})
    r = client.post("/v1/route", json={"namespace": NS.digest.hex(), "tokens": tokens})
    assert r.json()["instance"] == "b"
    assert client.delete("/v1/instances/b", headers=AUTH).status_code == 200
    r = client.post("/v1/route", json={"namespace": NS.digest.hex(), "tokens": tokens})
    assert r.json()["instance"] == "a"


def test_unknown_instance_and_tier_are_404() -> None:
    client = make_client()
    register(client, "a", [])
    r = client.post("/v1/clear", json={"instance": "zz"}, headers=AUTH)
    assert r.status_code == 404 and "zz" in r.json()["detail"]
    r = client.post("/v1/clear", json={"instance": "a", "tier": "ssd"}, headers=AUTH)
    assert r.status_code == 404 and "cpu" in r.json()["detail"]
    r = client.post("/v1/instances/zz/heartbeat", json={"stats": {}}, headers=AUTH)
    assert r.status_code == 404


def test_command_to_a_silent_instance_times_out_as_a_result() -> None:
    client = make_client()
    register(client, "a", [])
    r = client.post("/v1/clear", json={}, headers=AUTH)
    assert r.status_code == 200
    (result,) = r.json()["results"]
    assert result["ok"] is False and "no answer" in result["error"]


def test_expiry_drops_instances() -> None:
    index = GlobalIndex()
    index.register(InstanceState("a", "a", 4, ["cpu"]), reset=True)
    index.register(InstanceState("b", "b", 4, ["cpu"]), reset=True)
    index.instances["a"].last_seen -= 100
    assert index.expire(10) == ["a"]
    assert list(index.instances) == ["b"]


def test_prometheus_text_parses_and_names_the_metrics() -> None:
    engine = CacheEngine(load_settings(chunk_size=4, cpu_size=4096))
    try:
        keys = engine.keys_for(NS, list(range(16)))
        engine.store_buffers(keys, [bytes(256)] * 4).wait()
        engine.store_buffers(engine.keys_for(NS, list(range(100, 200))), [bytes(256)] * 25).wait()
        engine.lookup(keys)
        with engine.acquire(keys[:1]):
            pass
        text = render_stats(engine.stats(), {"instance": "x"})
    finally:
        engine.close()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("kvcore_lookups", "kvcore_hit_tokens", "kvcore_miss_tokens",
                 "kvcore_bytes_stored", "kvcore_bytes_loaded", "kvcore_evictions",
                 "kvcore_store_seconds", "kvcore_lookup_seconds", "kvcore_tier_used_bytes",
                 "kvcore_tier_budget_bytes", "kvcore_tier_usage_ratio"):
        assert name in families, name
    assert families["kvcore_store_seconds"].type == "histogram"
    evicted = {s.labels["tier"]: s.value for s in families["kvcore_evictions"].samples}
    assert evicted["cpu"] > 0
    (budget,) = families["kvcore_tier_budget_bytes"].samples
    assert budget.value == 4096 and budget.labels == {"instance": "x", "tier": "cpu"}


def test_reporter_without_controller_keeps_the_engine_serving() -> None:
    engine = CacheEngine(load_settings(chunk_size=4, cpu_size=1 << 20))
    reporter = attach(engine, url="http://127.0.0.1:9", token=TOKEN, timeout_s=0.2,
                      flush_s=0.01, heartbeat_s=0.05, queue_size=4)
    try:
        assert reporter is not None
        for i in range(50):
            keys = engine.keys_for(NS, list(range(i * 100, i * 100 + 8)))
            assert engine.store_buffers(keys, [bytes(16)] * 2).wait(5) == 2
            assert engine.lookup(keys).chunks == 2
        assert not reporter.registered
        assert reporter._events.qsize() <= 4
    finally:
        reporter.close()
        engine.close()


def test_attach_is_off_without_url() -> None:
    engine = CacheEngine(load_settings(chunk_size=4, cpu_size=1 << 20))
    try:
        assert attach(engine) is None
    finally:
        engine.close()


def test_core_import_needs_no_fastapi() -> None:
    code = ("import sys, kvcore, kvcore.control, kvcore.control.reporter, "
            "kvcore.control.client; assert 'fastapi' not in sys.modules; "
            "assert 'uvicorn' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_controller_refuses_to_start_without_token() -> None:
    r = subprocess.run([sys.executable, "-m", "kvcore.cli.main", "controller", "--port", "0"],
                       capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "KVCORE_CONTROLLER_TOKEN": ""})
    assert r.returncode == 2
    assert "KVCORE_CONTROLLER_TOKEN" in r.stderr


def test_lookup_of_a_long_prompt() -> None:
    client = make_client()
    tokens = list(range(100_000))
    register(client, "a", chunk_keys(NS, tokens, 4)[:10])
    r = client.post("/v1/lookup", json={"namespace": NS.digest.hex(), "tokens": tokens})
    assert r.status_code == 200 and r.json()["instances"][0]["tokens"] == 40


def test_heartbeat_stats_are_validated_and_rendered() -> None:
    client = make_client()
    register(client, "a", [])
    bad = client.post("/v1/instances/a/heartbeat", headers=AUTH,
                      json={"stats": {"tiers": {"cpu": {"used_bytes": "lots"}}}})
    assert bad.status_code == 422 and "used_bytes" in bad.json()["message"]
    stats = {"tiers": {"cpu": {"used_bytes": 10, "budget_bytes": 40, "chunks": 1},
                       "lmdb": {"error": "disk gone"}},
             "counters": {"hit_tokens_total": {"": 512.0}, "bytes_loaded_total": {"cpu": 9.0}},
             "histograms": {"store_seconds": {"": {"buckets": [[0.1, 1], [float("inf"), 2]],
                                                   "sum": 0.3, "count": 2}}}}
    ok = client.post("/v1/instances/a/heartbeat", headers={**AUTH, "Content-Type":
                     "application/json"}, content=json.dumps({"stats": stats}))
    assert ok.status_code == 200, ok.text
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    (hits,) = families["kvcore_hit_tokens"].samples
    assert hits.value == 512 and hits.labels == {"instance": "a", "name": "a"}
    ratio = {s.labels["tier"]: s.value for s in families["kvcore_tier_usage_ratio"].samples}
    assert ratio == {"cpu": 0.25}  # the tier that reported an error has no usage sample
    assert families["kvcore_controller_instances"].samples[0].value == 1
    (info,) = client.get("/v1/instances").json()["instances"]
    assert info["tiers"]["cpu"] == {"used_bytes": 10, "budget_bytes": 40, "chunks": 1}


def test_reporter_registers_and_leaves_with_the_engine() -> None:
    client = make_client(heartbeat_s=0.05)
    engine = CacheEngine(load_settings(chunk_size=4, cpu_size=1 << 20))
    settings = ControllerSettings(url="http://testserver", token=TOKEN, instance_id="r1",
                                  flush_s=0.01, heartbeat_s=0.05, poll_s=0.05)
    reporter = Reporter(engine, settings)
    reporter.http.call = _via(client)  # type: ignore[method-assign]
    reporter.start()
    try:
        keys = engine.keys_for(NS, list(range(8)))
        engine.store_buffers(keys, [bytes(16)] * 2).wait(5)
        deadline = time.monotonic() + 10
        answer = {}
        while time.monotonic() < deadline and answer.get("r1") != 8:
            answer = {r["instance"]: r["tokens"] for r in client.post(
                "/v1/lookup", json={"namespace": NS.digest.hex(),
                                    "tokens": list(range(8))}).json()["instances"]}
            time.sleep(0.02)
        assert answer == {"r1": 8}
        engine.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and client.get("/v1/instances").json()["instances"]:
            time.sleep(0.02)
        assert client.get("/v1/instances").json()["instances"] == []
        assert not any(t.name == "kvcore-report" and t.is_alive()
                       for t in threading.enumerate())
    finally:
        reporter.close()
        engine.close()


def _via(client: TestClient) -> Callable[..., tuple[int, Any]]:
    """Route the reporter's HTTP calls into the in-process app (no socket)."""

    def call(method: str, path: str, body: object = None,
             timeout_s: float | None = None) -> tuple[int, Any]:
        r = client.request(method, path, json=body, headers=AUTH)
        kind = r.headers.get("content-type", "")
        return r.status_code, (r.json() if "json" in kind else r.text)

    return call


SERVED = Namespace("org/tiny@main", layout="vllm-cpu", geometry="layers=2;page=4096")


def _reporting_engine(client: TestClient, instance: str) -> tuple[CacheEngine, Reporter]:
    engine = CacheEngine(load_settings(chunk_size=4, cpu_size=1 << 20))
    settings = ControllerSettings(url="http://testserver", token=TOKEN, instance_id=instance,
                                  flush_s=0.01, heartbeat_s=0.05, poll_s=0.05)
    reporter = Reporter(engine, settings)
    reporter.http.call = _via(client)  # type: ignore[method-assign]
    return engine, reporter.start()


def _wait(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


def test_namespaces_listed_and_prefixes_routed_by_served_model_name() -> None:
    """Two instances serve "tiny-chat" under namespaces that differ (page size): a gateway
    that knows only the name, the tenant and the token ids finds the one holding the prefix."""
    one, two = Namespace(**{**SERVED.__dict__, "geometry": "layers=2;page=8192"}), SERVED
    doc_a, doc_b = list(range(100, 108)), list(range(200, 208))
    engines: list[CacheEngine] = []
    with make_client(heartbeat_s=0.05) as client:  # one event loop for both reporters
        try:
            for instance, namespace, docs in (("r1", one, [(doc_a, "")]),
                                              ("r2", two, [(doc_b, ""), (doc_a, "acme")])):
                engine, _ = _reporting_engine(client, instance)
                engines.append(engine)
                engine.declare_namespace(namespace, served_as=["tiny-chat", "org/tiny"])
                for doc, tenant in docs:
                    keys = engine.keys_for(namespace.with_tenant(tenant), doc)
                    engine.store_buffers(keys, [bytes(16)] * len(keys)).wait(5)
            hidden = chunk_keys(Namespace("never-reported"), list(range(4)), 4)
            engines[0].store_buffers(hidden, [bytes(16)]).wait(5)

            def route(**body: Any) -> dict[str, Any]:
                r = client.post("/v1/route", json=body)
                assert r.status_code == 200, r.text
                return r.json()

            assert _wait(lambda: route(model="tiny-chat", tokens=doc_b)["tokens"] == 8)
            assert _wait(lambda: route(model="tiny-chat", tokens=doc_a)["tokens"] == 8)
            assert route(model="tiny-chat", tokens=doc_a) == {
                "instance": "r1", "name": "r1", "tokens": 8, "namespace": one.digest.hex()}
            assert route(model="org/tiny@main", tokens=doc_b)["instance"] == "r2"
            assert route(model="org/tiny", tokens=doc_a, tenant="acme") == {
                "instance": "r2", "name": "r2", "tokens": 8,
                "namespace": two.with_tenant("acme").digest.hex()}
            assert route(model="tiny-chat", tokens=doc_b, tenant="other")["tokens"] == 0
            assert route(model="another-model", tokens=doc_a)["instance"] is None
            assert route(model="tiny-chat", tokens=doc_a, rank=1)["instance"] is None
            # A namespace built by hand from the model name alone matches nothing.
            assert route(namespace={"model": "tiny-chat"}, tokens=doc_a)["tokens"] == 0
            looked = client.post("/v1/lookup", json={"model": "tiny-chat", "tokens": doc_a}).json()
            assert {(r["instance"], r["tokens"], r["namespace"]) for r in looked["instances"]} == {
                ("r1", 8, one.digest.hex()), ("r2", 0, two.digest.hex())}

            def served() -> list[dict[str, Any]]:
                found = client.get("/v1/namespaces?model=tiny-chat").json()["namespaces"]
                return found if len(found) == 3 else []

            listed = {(n["id"], n["tenant"]): n for n in _wait(served)}
            assert set(listed) == {(one.digest.hex(), ""), (two.digest.hex(), ""),
                                   (two.with_tenant("acme").digest.hex(), "acme")}
            acme = listed[two.with_tenant("acme").digest.hex(), "acme"]
            assert acme["served_as"] == ["tiny-chat", "org/tiny"] and acme["known"]
            assert acme["model"] == "org/tiny@main" and acme["geometry"] == SERVED.geometry
            assert acme["instances"] == [{"instance": "r2", "name": "r2",
                                          "chunks_by_tier": {"cpu": 2}}]
            tenants = client.get("/v1/namespaces", params={"tenant": "acme"}).json()["namespaces"]
            assert [n["id"] for n in tenants] == [two.with_tenant("acme").digest.hex()]
            every = client.get("/v1/namespaces").json()["namespaces"]
            unknown = [n for n in every if not n["known"]]
            assert [(n["id"], n["instances"][0]["chunks_by_tier"]) for n in unknown] == [
                (hidden[0][:8].hex(), {"cpu": 1})]
        finally:
            for engine in engines:
                engine.close()


@pytest.mark.parametrize("body,where", [
    ({"tokens": [1]}, "exactly one of namespace and model"),
    ({"namespace": NS.digest.hex(), "model": "m", "tokens": [1]}, "exactly one"),
    ({"model": "", "tokens": [1]}, "model"),
    ({"model": "m", "rank": -1, "tokens": [1]}, "rank"),
])
def test_route_by_model_bad_requests_say_what_is_wrong(body: dict, where: str) -> None:
    r = make_client().post("/v1/route", json=body)
    assert r.status_code == 422 and where in r.json()["message"], r.text


def test_a_reported_namespace_cannot_claim_another_ones_chunks() -> None:
    """The controller hashes the reported fields itself: an instance that reports fields of
    one namespace is listed under that namespace's digest, whatever it holds."""
    client = make_client()
    register(client, "r3", chunk_keys(NS, list(range(8)), 4))
    r = client.post("/v1/instances/r3/heartbeat", headers=AUTH, json={
        "stats": {}, "namespaces": [{"model": "forged", "served_as": ["tiny-chat"]}]})
    assert r.status_code == 200, r.text
    answer = client.post("/v1/route", json={"model": "tiny-chat", "tokens": list(range(8))})
    assert answer.json() == {"instance": "r3", "name": "r3", "tokens": 0,
                             "namespace": Namespace("forged").digest.hex()}
    too_many = [{"model": f"m{i}"} for i in range(513)]
    r = client.post("/v1/instances/r3/heartbeat", headers=AUTH,
                    json={"stats": {}, "namespaces": too_many})
    assert r.status_code == 422 and "namespaces" in r.json()["message"]


def test_reporter_leaves_out_namespaces_the_controller_would_refuse() -> None:
    from kvcore.control.reporter import reportable_namespaces
    from kvcore.namespaces import NamespaceBook

    book = NamespaceBook()
    book.declare(SERVED, served_as=["tiny-chat"])
    book.remember(SERVED.with_tenant("t" * 300))  # over the 256-character tenant limit
    book.remember(SERVED.with_tenant("fine"))
    assert [r["tenant"] for r in reportable_namespaces(book.entries())] == ["", "fine"]
