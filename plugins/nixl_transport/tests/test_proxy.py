"""``kvcore pd-proxy`` against fake OpenAI-compatible upstreams (no vLLM needed)."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from conftest import closed_address

from kvcore_nixl.proxy import make_server


class FakeServer:
    """Records request bodies; answers a 3-event stream or one JSON object."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.bodies: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.bodies.append(body)
                if body.get("stream"):
                    events = [f"data: {json.dumps({'text': owner.name + str(i)})}\n\n"
                              for i in range(3)] + ["data: [DONE]\n\n"]
                    data = "".join(events).encode()
                    ctype = "text/event-stream"
                else:
                    data = json.dumps({"from": owner.name}).encode()
                    ctype = "application/json"
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def upstreams() -> Iterator[tuple[FakeServer, FakeServer]]:
    prefill, decode = FakeServer("P"), FakeServer("D")
    yield prefill, decode
    prefill.close()
    decode.close()


def serve(prefill: list[str], decode: list[str]) -> ThreadingHTTPServer:
    proxy = make_server("127.0.0.1", 0, prefill, decode, timeout_s=10)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    return proxy


def post(proxy: ThreadingHTTPServer, body: dict) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.server_address[1], timeout=10)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_prefill_first_then_decode_streams(upstreams: Any) -> None:
    prefill, decode = upstreams
    proxy = serve([prefill.url], [decode.url])
    try:
        request = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 16, "stream": True,
                   "stream_options": {"include_usage": True}}
        status, data = post(proxy, request)
        assert status == 200
        assert data.decode().count("data: ") == 4 and '"D2"' in data.decode()
        assert prefill.bodies == [{"model": "m", "prompt": [1, 2, 3], "max_tokens": 1,
                                   "stream": False}]
        assert decode.bodies == [request]
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_prefill_down_decode_still_answers(upstreams: Any) -> None:
    _, decode = upstreams
    proxy = serve([f"http://{closed_address()}"], [decode.url])
    try:
        status, data = post(proxy, {"model": "m", "prompt": "w3 w4", "max_tokens": 4})
        assert status == 200 and json.loads(data) == {"from": "D"}
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_decode_down_is_a_502(upstreams: Any) -> None:
    prefill, _ = upstreams
    proxy = serve([prefill.url], [f"http://{closed_address()}"])
    try:
        status, data = post(proxy, {"model": "m", "prompt": "w3", "max_tokens": 4})
        assert status == 502 and "decode server" in json.loads(data)["error"]
    finally:
        proxy.shutdown()
        proxy.server_close()
