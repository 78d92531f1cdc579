"""The server side: exposes a process's CPU tier to peers over NIXL.

A peer talks to the server over a small TCP side channel (:mod:`kvcore_nixl.wire`):

- ``hello`` -> the agent's NIXL metadata (connection info), once per connection;
- ``contains`` (keys) -> which keys the CPU tier holds or is storing right now;
- ``lease`` (keys) -> the server waits (briefly) for stores of those keys still running, then
  acquires the chunks it holds (so they are neither evicted nor
  freed), registers their memory with NIXL and answers ``(address, length)`` per chunk plus the
  partial NIXL metadata of that registration; the peer then READs the bytes itself;
- ``release`` (lease id) -> ends a lease early (the peer's transfer failed);
- ``stats`` -> live leases, registrations, chunks held and being stored (tests, operators).

A lease ends when the peer's READ completes (its notification ``kvcore-done:<id>`` arrives), on
``release``, or after ``lease_timeout_s``; each end deregisters the memory and releases the
chunks, on every path.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvcore.keys import ChunkKey
from kvcore.pending import PendingStores
from kvcore.tiers.cpu import CpuTier
from kvcore_nixl import wire
from kvcore_nixl.agent import Agent, address_of
from kvcore_nixl.settings import split_address

log = logging.getLogger("kvcore.nixl.server")
DONE_PREFIX = b"kvcore-done:"
BUSY_POLL_S = 0.0001
IDLE_POLL_S = 0.005


@dataclass
class _Lease:
    keys: list[ChunkKey]
    descs: Any
    expires: float


class ChunkServer:
    """Serves ``cpu``'s chunks to peers; :meth:`close` ends every lease."""

    def __init__(
        self, cpu: CpuTier, agent: Agent, listen: str = "127.0.0.1:0",
        lease_timeout_s: float = 30.0, pending: PendingStores | None = None,
        store_wait_s: float = 1.0,
    ) -> None:
        """``pending``: the engine's stores in progress; chunks there count as held, and a
        lease waits for them up to ``store_wait_s`` (a decode side that asks right after the
        prefill answered finds the whole prompt)."""
        self.cpu = cpu
        self.agent = agent
        self.lease_timeout_s = lease_timeout_s
        self.pending = pending
        self.store_wait_s = store_wait_s
        self._leases: dict[int, _Lease] = {}
        self._lock = threading.Lock()
        self._next_id = 1
        self._stop = threading.Event()
        host, port = split_address(listen)
        self._tcp = _TCPServer((host, port), _Handler)
        self._tcp.owner = self
        self.address = f"{host}:{self._tcp.server_address[1]}"
        self._threads = [
            threading.Thread(target=self._tcp.serve_forever, kwargs={"poll_interval": 0.1},
                             name="kvcore-nixl-serve", daemon=True),
            threading.Thread(target=self._reap, name="kvcore-nixl-reap", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        log.info("kvcore nixl server on %s (agent %s)", self.address, agent.name)

    # -- requests ------------------------------------------------------------------------------

    def handle(self, header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        op = header.get("op")
        if op == "hello":
            return {"agent": self.agent.name}, self.agent.metadata()
        if op == "contains":
            keys = wire.split_keys(body)
            hits = self.cpu.contains(keys)
            if self.pending is not None and not all(hits):
                hits = [h or p for h, p in zip(hits, self.pending.contains(keys))]
            return {"hits": [int(h) for h in hits]}, b""
        if op == "lease":
            return self.lease(wire.split_keys(body))
        if op == "release":
            self.release(int(header.get("lease", 0)))
            return {"ok": True}, b""
        if op == "stats":
            with self._lock:
                leases = len(self._leases)
            return {"leases": leases, "registrations": self.agent.registrations,
                    "chunks": self.cpu.usage().chunks,
                    "storing": len(self.pending) if self.pending is not None else 0}, b""
        return {"error": f"unknown op {op!r}"}, b""

    def lease(self, keys: list[ChunkKey]) -> tuple[dict[str, Any], bytes]:
        """Hold and register the chunks of ``keys`` this tier has; describe them."""
        if self.pending is not None:
            missing = [k for k, hit in zip(keys, self.cpu.contains(keys)) if not hit]
            if missing and not self.pending.wait(missing, self.store_wait_s):
                log.info("kvcore nixl: stores still running after %.1fs; leasing what is held",
                         self.store_wait_s)
        views = self.cpu.acquire(keys)
        held = [k for k, v in zip(keys, views) if v is not None]
        if not held:
            return {"lease": 0, "chunks": [None] * len(keys)}, b""
        chunks: list[list[int] | None] = []
        regions = []
        for view in views:
            if view is None:
                chunks.append(None)
                continue
            region = (address_of(np.frombuffer(view, dtype=np.uint8)), view.nbytes)
            regions.append(region)
            chunks.append(list(region))
        try:
            descs = self.agent.register(regions)
        except Exception:
            self.cpu.release(held)
            raise
        try:
            metadata = self.agent.partial_metadata(descs)
        except Exception:
            self.agent.deregister(descs)
            self.cpu.release(held)
            raise
        with self._lock:
            lease_id = self._next_id
            self._next_id += 1
            self._leases[lease_id] = _Lease(held, descs, time.monotonic() + self.lease_timeout_s)
        return {"lease": lease_id, "chunks": chunks}, metadata

    def release(self, lease_id: int) -> bool:
        """End a lease: deregister its memory and release its chunks."""
        with self._lock:
            lease = self._leases.pop(lease_id, None)
        if lease is None:
            return False
        try:
            self.agent.deregister(lease.descs)
        except Exception as exc:
            log.warning("kvcore nixl: deregistration failed: %s", exc)
        finally:
            self.cpu.release(lease.keys)
        return True

    def active_leases(self) -> int:
        with self._lock:
            return len(self._leases)

    # -- completion and expiry -----------------------------------------------------------------

    def _reap(self) -> None:
        """Poll notifications (which also drives NIXL's progress) and expire leases.

        While a lease is live a peer may be reading, and without NIXL's progress thread a
        transport that needs the target's help (UCX over TCP) only moves when this polls: poll
        every ``BUSY_POLL_S`` then, every ``IDLE_POLL_S`` otherwise.
        """
        while not self._stop.wait(BUSY_POLL_S if self._leases else IDLE_POLL_S):
            try:
                notifs = self.agent.nixl.get_new_notifs()
            except Exception as exc:
                log.debug("kvcore nixl: notification poll failed: %s", exc)
                notifs = {}
            for messages in notifs.values():
                for message in messages:
                    if message.startswith(DONE_PREFIX):
                        try:
                            self.release(int(message[len(DONE_PREFIX):]))
                        except ValueError:
                            pass
            now = time.monotonic()
            with self._lock:
                expired = [i for i, lease in self._leases.items() if lease.expires < now]
            for lease_id in expired:
                log.info("kvcore nixl: lease %d expired unconfirmed", lease_id)
                self.release(lease_id)

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._tcp.shutdown()
        self._tcp.server_close()
        for thread in self._threads:
            thread.join(timeout=2.0)
        with self._lock:
            ids = list(self._leases)
        for lease_id in ids:
            self.release(lease_id)


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: ChunkServer


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        owner = self.server.owner  # type: ignore[attr-defined]
        while not owner._stop.is_set():
            try:
                header, body = wire.recv(sock)
            except (OSError, wire.WireError):
                return
            try:
                reply, data = owner.handle(header, body)
            except Exception as exc:
                log.warning("kvcore nixl: %s failed: %s", header.get("op"), exc)
                reply, data = {"error": f"{type(exc).__name__}: {exc}"}, b""
            try:
                wire.send(sock, reply, data)
            except OSError:
                return
