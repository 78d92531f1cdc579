"""``kvcore pd-proxy`` / ``python -m kvcore_nixl.proxy``: prefill/decode disaggregation in front
of two (or more) OpenAI-compatible vLLM servers.

For each completion request the proxy first sends a copy to a prefill server with
``max_tokens=1`` (and no streaming), which computes the prompt's KV and stores it in its kvcore
CPU tier; then it sends the original request to a decode server, whose kvcore finds the prefix
at the prefill instance through the ``nixl_peer`` tier and loads it instead of computing it, and
streams the decode server's answer back unchanged. If the prefill step fails, the decode server
simply computes the prompt itself: the answer is the same, only slower.

Standard library only; servers are picked round-robin.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import logging
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("kvcore.nixl.proxy")
COMPLETION_PATHS = ("/v1/completions", "/v1/chat/completions")
_PASS_HEADERS = ("authorization", "content-type", "x-request-id")


class Upstreams:
    """Round-robin choice of prefill and decode base URLs."""

    def __init__(self, prefill: list[str], decode: list[str], timeout_s: float) -> None:
        if not decode:
            raise ValueError("at least one --decode URL is needed")
        self.prefill = [u.rstrip("/") for u in prefill]
        self.decode = [u.rstrip("/") for u in decode]
        self.timeout_s = timeout_s
        self._prefill_cycle = itertools.cycle(self.prefill) if self.prefill else None
        self._decode_cycle = itertools.cycle(self.decode)
        self._lock = threading.Lock()

    def next_prefill(self) -> str | None:
        with self._lock:
            return next(self._prefill_cycle) if self._prefill_cycle else None

    def next_decode(self) -> str:
        with self._lock:
            return next(self._decode_cycle)


def open_upstream(
    base: str, method: str, path: str, body: bytes | None, headers: dict[str, str],
    timeout_s: float,
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    parts = urlsplit(base)
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname or "127.0.0.1", parts.port, timeout=timeout_s)
    try:
        conn.request(method, parts.path.rstrip("/") + path, body=body, headers=headers)
        return conn, conn.getresponse()
    except Exception:
        conn.close()
        raise


def prefill_request(body: dict[str, Any]) -> dict[str, Any]:
    """The request the prefill server gets: same prompt, one token, no streaming."""
    request = dict(body, max_tokens=1, stream=False)
    if "max_completion_tokens" in request:
        request["max_completion_tokens"] = 1
    request.pop("stream_options", None)
    return request


class ProxyHandler(BaseHTTPRequestHandler):
    server_version = "kvcore-pd-proxy"
    protocol_version = "HTTP/1.1"
    upstreams: Upstreams

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("%s " + format, self.address_string(), *args)

    def _headers(self) -> dict[str, str]:
        return {k: v for k, v in self.headers.items() if k.lower() in _PASS_HEADERS}

    def do_GET(self) -> None:  # noqa: N802
        self._forward(self.upstreams.next_decode(), "GET", None)

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path not in COMPLETION_PATHS:
            self._forward(self.upstreams.next_decode(), "POST", raw)
            return
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("expected a JSON object")
        except ValueError as exc:
            self._reply(400, json.dumps({"error": f"bad request body: {exc}"}).encode())
            return
        self._prefill(body)
        self._forward(self.upstreams.next_decode(), "POST", raw)

    def _prefill(self, body: dict[str, Any]) -> None:
        base = self.upstreams.next_prefill()
        if base is None:
            return
        data = json.dumps(prefill_request(body)).encode()
        headers = {**self._headers(), "Content-Type": "application/json"}
        try:
            conn, resp = open_upstream(base, "POST", self.path, data, headers,
                                       self.upstreams.timeout_s)
            try:
                resp.read()
                if resp.status >= 400:
                    log.warning("kvcore pd-proxy: prefill %s answered %d", base, resp.status)
            finally:
                conn.close()
        except Exception as exc:  # decode will compute the prompt itself
            log.warning("kvcore pd-proxy: prefill %s failed (%s); decode computes", base, exc)

    def _forward(self, base: str, method: str, body: bytes | None) -> None:
        try:
            conn, resp = open_upstream(base, method, self.path, body, self._headers(),
                                       self.upstreams.timeout_s)
        except Exception as exc:
            self._reply(502, json.dumps({"error": f"decode server {base}: {exc}"}).encode())
            return
        try:
            self.send_response(resp.status)
            self.send_header("Content-Type", resp.getheader("Content-Type", "application/json"))
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            while True:
                part = resp.read1(65536)
                if not part:
                    break
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except OSError as exc:
            log.info("kvcore pd-proxy: stream ended early: %s", exc)
            self.close_connection = True
        finally:
            conn.close()

    def _reply(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def make_server(
    host: str, port: int, prefill: list[str], decode: list[str], timeout_s: float = 600.0
) -> ThreadingHTTPServer:
    """A ready (not yet serving) proxy server; ``server.server_address`` has the bound port."""
    handler = type("Handler", (ProxyHandler,), {"upstreams": Upstreams(prefill, decode, timeout_s)})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--prefill", action="append", default=[], metavar="URL",
                        help="prefill server base URL, e.g. http://127.0.0.1:8100 (repeatable)")
    parser.add_argument("--decode", action="append", default=[], metavar="URL", required=True,
                        help="decode server base URL, e.g. http://127.0.0.1:8200 (repeatable)")
    parser.add_argument("--timeout-s", type=float, default=600.0,
                        help="longest wait for an upstream answer")


def run(args: argparse.Namespace) -> int:
    server = make_server(args.host, args.port, args.prefill, args.decode, args.timeout_s)
    host, port = (str(part) for part in server.server_address[:2])
    print(f"kvcore pd-proxy on http://{host}:{port}: prefill {args.prefill} -> decode "
          f"{args.decode}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="kvcore pd-proxy", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
