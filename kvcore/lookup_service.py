"""Lookups across processes: a worker's CPU tier answered to a scheduler in another process.

Engines such as vLLM's OpenAI server run the scheduler in one process and the worker, whose
:class:`~kvcore.engine.CacheEngine` holds the CPU tier, in another. The worker runs a
:class:`LookupServer` on a local (Linux abstract-namespace) Unix socket; the scheduler asks it
through a :class:`LookupClient`. The wire format is binary and fixed, no pickle:

    request:  b"KVL1" | u8 prefetch | u32 n | n * 24-byte chunk keys
    response: u32 leading chunks found

A client that cannot reach the server, or gets no answer within its timeout, reports 0 chunks:
the engine recomputes, it never waits long or fails.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
from collections.abc import Sequence

from kvcore.engine import CacheEngine
from kvcore.keys import KEY_BYTES, ChunkKey

log = logging.getLogger("kvcore.lookup")

MAGIC = b"KVL1"
_HEAD = struct.Struct("<4sBI")
_COUNT = struct.Struct("<I")
MAX_KEYS = 1 << 20  # a 256M-token prompt at 256 tokens a chunk: far beyond any model's context


def socket_name(service: str) -> str:
    """Abstract-namespace socket name for a service id (shared by server and client)."""
    return f"\0kvcore-lookup-{os.getuid()}-{service}"


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        piece = sock.recv(n - len(data))
        if not piece:
            raise ConnectionError("peer closed the connection")
        data += piece
    return bytes(data)


class LookupServer:
    """Answers lookups against ``engine`` on ``socket_name(service)``, one thread per client."""

    def __init__(self, engine: CacheEngine, service: str) -> None:
        self.engine = engine
        self.name = socket_name(service)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.name)
        self._sock.listen(16)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="kvcore-lookup", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name="kvcore-lookup-conn").start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while not self._closed.is_set():
                try:
                    magic, prefetch, n = _HEAD.unpack(_recv_exact(conn, _HEAD.size))
                    if magic != MAGIC or n > MAX_KEYS:
                        log.warning("kvcore lookup server: malformed request; closing")
                        return
                    blob = _recv_exact(conn, n * KEY_BYTES)
                    keys = [blob[i * KEY_BYTES:(i + 1) * KEY_BYTES] for i in range(n)]
                    found = self.engine.lookup(keys, prefetch=bool(prefetch)).chunks
                    conn.sendall(_COUNT.pack(found))
                except (ConnectionError, OSError):
                    return

    def close(self) -> None:
        self._closed.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


class LookupClient:
    """Asks a :class:`LookupServer`; any failure or timeout answers 0 chunks."""

    def __init__(self, service: str, timeout_s: float = 1.0) -> None:
        self.name = socket_name(service)
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    def lookup(self, keys: Sequence[ChunkKey], prefetch: bool = True) -> int:
        """Leading chunks of ``keys`` the server's engine holds (0 when it cannot be asked)."""
        if not keys:
            return 0
        request = _HEAD.pack(MAGIC, int(prefetch), len(keys)) + b"".join(keys)
        with self._lock:
            for attempt in range(2):  # one reconnect: the server may have restarted
                try:
                    sock = self._connect()
                    sock.sendall(request)
                    (found,) = _COUNT.unpack(_recv_exact(sock, _COUNT.size))
                    self._warned = False
                    return min(found, len(keys))
                except (OSError, ConnectionError) as exc:
                    self._drop()
                    if attempt == 1:
                        self._warn(exc)
        return 0

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout_s)
            try:
                sock.connect(self.name)
            except OSError:
                sock.close()
                raise
            self._sock = sock
        return self._sock

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _warn(self, exc: BaseException) -> None:
        if not self._warned:
            self._warned = True
            log.warning("kvcore lookup: the worker's cache cannot be asked (%s: %s); "
                        "counting misses until it answers", type(exc).__name__, exc)

    def close(self) -> None:
        with self._lock:
            self._drop()
