"""The server side: exposes a process's CPU tier to peers over NIXL.

A peer talks to the server over a small TCP side channel (:mod:`kvcore_nixl.wire`):

- ``hello`` -> the agent's NIXL metadata (connection info), once per connection;
- ``contains`` (keys) -> which keys the CPU tier holds or is storing right now;
- ``lease`` (keys) -> the server waits (briefly) for stores of those keys still running, then
  acquires the chunks it holds (so they are neither evicted nor
  freed), registers their memory with NIXL and answers ``(address, length, frame header)`` per
  chunk plus the partial NIXL metadata of that registration; the peer then READs the bytes itself
  and verifies each chunk against its header (:mod:`kvcore.chunk_format`: key, length, XXH3-64
  checksum) like a value from any other lower tier (a chunk that does not verify is a miss);
- ``release`` (lease id) -> ends a lease early (the peer's transfer failed);
- ``stats`` -> live leases, registrations, chunks held and being stored (tests, operators).

A lease ends when the peer's READ completes (its notification ``kvcore-done:<id>`` arrives), on
``release``, or after ``lease_timeout_s``; each end deregisters the memory and releases the
chunks, on every path.

Hostile peers (issue 17). With ``KVCORE_NIXL_SECRET`` a connection must pass the challenge-
response of :mod:`kvcore_nixl.auth` before anything but ``hello``; without one the server only
listens on loopback (unless told otherwise) and warns. A lease belongs to the connection that
took it: only it can ``release`` it, only its NIXL agent's notification ends it, and its leases
end when it disconnects. Each connection holds at most ``max_leases_per_peer`` leases and
``max_lease_fraction`` of the CPU tier's budget (all peers together: 75%), so the owner can
always store. At most ``max_connections`` connections (one thread each), an idle timeout,
a deadline per frame and a size limit per frame; a malformed frame closes its connection and
nothing else.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvcore import chunk_format
from kvcore.interfaces import Attachment, MemoryTier
from kvcore.keys import ChunkKey
from kvcore.pending import PendingStores
from kvcore_nixl import auth, wire
from kvcore_nixl.agent import Agent, address_of
from kvcore_nixl.settings import split_address

log = logging.getLogger("kvcore.nixl.server")
DONE_PREFIX = b"kvcore-done:"
BUSY_POLL_S = 0.0001
IDLE_POLL_S = 0.005


ALL_PEERS_FRACTION = 0.75
"""Share of the CPU tier's budget all peers' leases together may hold: the rest stays evictable,
so the owner can always store."""
MAX_REQUEST_HEADER = 16 * 1024
"""Largest JSON header a peer may send (requests are a few small fields)."""


@dataclass(frozen=True)
class Limits:
    """What one server grants its peers (see :class:`~kvcore_nixl.settings.NixlSettings`)."""

    max_connections: int = 64
    idle_timeout_s: float = 60.0
    frame_timeout_s: float = 5.0
    max_frame_bytes: int = 1 << 20
    max_leases_per_peer: int = 16
    max_lease_fraction: float = 0.5
    allow_unauthenticated: bool = False


def frame_header(key: ChunkKey, view: memoryview) -> bytes:
    """The :mod:`kvcore.chunk_format` header of a held chunk (key, length, checksum), sent with
    its lease so the reader verifies the bytes it READs as it would a framed value."""
    return bytes(chunk_format.encode(key, view)[0])


class Malformed(ValueError):
    """A frame the protocol does not allow: its connection is closed."""


@dataclass(eq=False)
class _Peer:
    """One side-channel connection."""

    id: int
    address: str
    authenticated: bool = False
    agent: str | None = None
    client_nonce: str = ""
    server_nonce: str = ""
    leases: set[int] = field(default_factory=set)
    leased_bytes: int = 0


@dataclass
class _Lease:
    views: list[memoryview]
    """The memory tier's views this lease holds (released when it ends)."""
    descs: Any
    expires: float
    owner: _Peer | None = None
    nbytes: int = 0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ChunkServer(Attachment):
    """Serves ``memory``'s chunks to peers; :meth:`close` ends every lease. As an engine's
    ``nixl_server`` attachment it starts and stops with the engine."""

    def __init__(
        self, memory: MemoryTier, agent: Agent, listen: str = "127.0.0.1:0",
        lease_timeout_s: float = 30.0, pending: PendingStores | None = None,
        store_wait_s: float = 1.0, secret: bytes | None = None, limits: Limits | None = None,
    ) -> None:
        """``pending``: the engine's stores in progress; chunks there count as held, and a
        lease waits for them up to ``store_wait_s`` (a decode side that asks right after the
        prefill answered finds the whole prompt)."""
        self.memory = memory
        self.agent = agent
        self.lease_timeout_s = lease_timeout_s
        self.pending = pending
        self.store_wait_s = store_wait_s
        self.secret = secret or None
        self.limits = limits or Limits()
        self._leases: dict[int, _Lease] = {}
        self._lock = threading.Lock()
        self._next_id = 1
        self._next_peer = 1
        self._leased_bytes = 0
        self._stop = threading.Event()
        self._slots = threading.BoundedSemaphore(self.limits.max_connections)
        self.counters = {"refused_connections": 0, "malformed": 0, "auth_failures": 0,
                         "lease_refusals": 0}
        host, port = split_address(listen)
        if self.secret is None:
            if not is_loopback(host) and not self.limits.allow_unauthenticated:
                raise ValueError(
                    f"KVCORE_NIXL_LISTEN={listen!r} is reachable beyond this machine and "
                    "KVCORE_NIXL_SECRET is not set: anyone who can connect could lease and read "
                    "this instance's KV cache. Set KVCORE_NIXL_SECRET (the same on every "
                    "instance of the deployment), or KVCORE_NIXL_ALLOW_UNAUTHENTICATED=1 on a "
                    "network you trust")
            log.warning("kvcore nixl: serving on %s without KVCORE_NIXL_SECRET: any process "
                        "that can connect may lease and read chunks", listen)
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

    def handle(self, header: dict[str, Any], body: bytes,
               peer: _Peer | None = None) -> tuple[dict[str, Any], bytes]:
        """Answer one frame of ``peer``; raises :class:`Malformed` to close its connection."""
        if peer is None:  # in-process callers (tests): a peer that passed authentication
            peer = _Peer(0, "local", authenticated=True)
        op = header.get("op")
        if not isinstance(op, str):
            raise Malformed("no op")
        if not peer.authenticated:
            return self._handshake(peer, op, header)
        if op == "contains":
            keys = _keys(body)
            hits = self.memory.contains(keys)
            if self.pending is not None and not all(hits):
                hits = [h or p for h, p in zip(hits, self.pending.contains(keys))]
            return {"hits": [int(h) for h in hits]}, b""
        if op == "lease":
            return self.lease(_keys(body), peer)
        if op == "release":
            lease_id = header.get("lease")
            if not isinstance(lease_id, int) or isinstance(lease_id, bool):
                raise Malformed("lease id is not an integer")
            return {"ok": self.release(lease_id, peer)}, b""
        if op == "stats":
            with self._lock:
                leases = len(self._leases)
            return {"leases": leases, "registrations": self.agent.registrations,
                    "chunks": self.memory.usage().chunks,
                    "storing": len(self.pending) if self.pending is not None else 0,
                    **self.counters}, b""
        raise Malformed(f"unknown op {op[:32]!r}")

    def _handshake(self, peer: _Peer, op: str, header: dict[str, Any]
                   ) -> tuple[dict[str, Any], bytes]:
        """``hello`` (and, with a secret, ``auth``): see :mod:`kvcore_nixl.auth`."""
        if op == "hello" and not peer.server_nonce:
            agent = header.get("agent")
            peer.agent = agent if isinstance(agent, str) and 0 < len(agent) <= 256 else None
            if self.secret is None:
                peer.authenticated = True
                return {"agent": self.agent.name}, self.agent.metadata()
            client_nonce = header.get("nonce")
            if not isinstance(client_nonce, str) or not auth.valid_nonce(client_nonce):
                self.counters["auth_failures"] += 1
                raise Malformed("hello without a nonce (KVCORE_NIXL_SECRET is required)")
            peer.client_nonce, peer.server_nonce = client_nonce, auth.nonce()
            return {"challenge": peer.server_nonce, "proof": auth.server_proof(
                self.secret, peer.client_nonce, peer.server_nonce)}, b""
        if op == "auth" and self.secret is not None and peer.server_nonce:
            expected = auth.client_proof(self.secret, peer.client_nonce, peer.server_nonce)
            if not auth.check(expected, header.get("proof")):
                self.counters["auth_failures"] += 1
                raise Malformed("wrong proof of KVCORE_NIXL_SECRET")
            peer.authenticated = True
            return {"agent": self.agent.name}, self.agent.metadata()
        self.counters["auth_failures"] += 1
        raise Malformed(f"{op[:32]!r} before authentication")

    def lease(self, keys: list[ChunkKey], peer: _Peer | None = None
              ) -> tuple[dict[str, Any], bytes]:
        """Hold and register the chunks of ``keys`` this tier has (within ``peer``'s share);
        describe them."""
        peer = peer or _Peer(0, "local", authenticated=True)
        if len(peer.leases) >= self.limits.max_leases_per_peer:
            self.counters["lease_refusals"] += 1
            return {"lease": 0, "chunks": [None] * len(keys), "busy": True}, b""
        if self.pending is not None:
            missing = [k for k, hit in zip(keys, self.memory.contains(keys)) if not hit]
            if missing and not self.pending.wait(missing, self.store_wait_s):
                log.info("kvcore nixl: stores still running after %.1fs; leasing what is held",
                         self.store_wait_s)
        views = self.memory.acquire(keys)
        views, nbytes = self._within_share(views, peer)
        held = [v for v in views if v is not None]
        if not held:
            return {"lease": 0, "chunks": [None] * len(keys)}, b""
        chunks: list[list[int | str] | None] = []
        regions = []
        try:
            for key, view in zip(keys, views):
                if view is None:
                    chunks.append(None)
                    continue
                region = (address_of(np.frombuffer(view, dtype=np.uint8)), view.nbytes)
                regions.append(region)
                chunks.append([*region, frame_header(key, view).hex()])
            descs = self.agent.register(regions)
        except Exception:
            self._unshare(peer, nbytes)
            self.memory.release(held)
            raise
        try:
            metadata = self.agent.partial_metadata(descs)
        except Exception:
            self.agent.deregister(descs)
            self._unshare(peer, nbytes)
            self.memory.release(held)
            raise
        with self._lock:
            lease_id = self._next_id
            self._next_id += 1
            self._leases[lease_id] = _Lease(held, descs, time.monotonic() + self.lease_timeout_s,
                                            peer, nbytes)
            peer.leases.add(lease_id)
        return {"lease": lease_id, "chunks": chunks}, metadata

    def _within_share(self, views: list[Any], peer: _Peer
                      ) -> tuple[list[Any], int]:
        """Keep the leading views that fit the peer's share of the budget (and all peers'
        share); release the rest. Returns (views, bytes reserved)."""
        budget = self.memory.usage().budget_bytes
        per_peer = int(budget * self.limits.max_lease_fraction)
        everyone = max(per_peer, int(budget * ALL_PEERS_FRACTION))
        out: list[Any] = []
        drop: list[memoryview] = []
        taken = 0
        with self._lock:
            for view in views:
                if view is None or drop:
                    out.append(None)
                    if view is not None:
                        drop.append(view)
                    continue
                n = view.nbytes
                if (peer.leased_bytes + taken + n > per_peer
                        or self._leased_bytes + taken + n > everyone):
                    out.append(None)
                    drop.append(view)
                    continue
                taken += n
                out.append(view)
            peer.leased_bytes += taken
            self._leased_bytes += taken
        if drop:
            self.counters["lease_refusals"] += 1
            self.memory.release(drop)
        return out, taken

    def _unshare(self, peer: _Peer | None, nbytes: int) -> None:
        with self._lock:
            if peer is not None:
                peer.leased_bytes -= nbytes
            self._leased_bytes -= nbytes

    def release(self, lease_id: int, peer: _Peer | None = None, agent: str | None = None
                ) -> bool:
        """End a lease: deregister its memory and release its chunks.

        With ``peer`` (a ``release`` frame) or ``agent`` (a completion notification), only a
        lease taken by that connection, or by that NIXL agent, ends.
        """
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None:
                return False
            owner = lease.owner
            remote = owner is not None and owner.id != 0  # leased over the side channel
            if remote and peer is not None and owner is not peer:
                return False  # another connection's lease
            if remote and agent is not None and owner.agent != agent:  # type: ignore[union-attr]
                return False  # a notification from another agent

            del self._leases[lease_id]
            if owner is not None:
                owner.leases.discard(lease_id)
                owner.leased_bytes -= lease.nbytes
            self._leased_bytes -= lease.nbytes
        try:
            self.agent.deregister(lease.descs)
        except Exception as exc:
            log.warning("kvcore nixl: deregistration failed: %s", exc)
        finally:
            self.memory.release(lease.views)
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
            for sender, messages in notifs.items():
                name = sender.decode(errors="replace") if isinstance(sender, bytes) else sender
                for message in messages:
                    if message.startswith(DONE_PREFIX):
                        try:
                            lease_id = int(message[len(DONE_PREFIX):])
                        except ValueError:
                            continue
                        self.release(lease_id, agent=str(name))
            now = time.monotonic()
            with self._lock:
                expired = [i for i, lease in self._leases.items() if lease.expires < now]
            for lease_id in expired:
                log.info("kvcore nixl: lease %d expired unconfirmed", lease_id)
                self.release(lease_id)

    # -- connections ---------------------------------------------------------------------------

    def connected(self, address: str) -> _Peer:
        with self._lock:
            peer = _Peer(self._next_peer, address)
            self._next_peer += 1
        return peer

    def disconnected(self, peer: _Peer) -> None:
        """The connection is gone: its leases end (its reads are over, or abandoned)."""
        with self._lock:
            ids = list(peer.leases)
        for lease_id in ids:
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
    request_queue_size = 128
    owner: ChunkServer

    def process_request(self, request: Any, client_address: Any) -> None:
        """One thread per connection, at most ``max_connections``: beyond, close at once."""
        if not self.owner._slots.acquire(blocking=False):
            self.owner.counters["refused_connections"] += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.owner._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.owner._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("kvcore nixl: connection from %s failed", client_address, exc_info=True)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        owner: ChunkServer = self.server.owner  # type: ignore[attr-defined]
        limits = owner.limits
        peer = owner.connected(f"{self.client_address[0]}:{self.client_address[1]}")
        try:
            while not owner._stop.is_set():
                # An unauthenticated connection gets one frame's time, not the idle timeout.
                sock.settimeout(limits.idle_timeout_s if peer.authenticated
                                else limits.frame_timeout_s)
                try:
                    header, body = wire.recv(sock, MAX_REQUEST_HEADER, limits.max_frame_bytes,
                                             limits.frame_timeout_s)
                except (OSError, wire.WireError):
                    return
                try:
                    reply, data = owner.handle(header, body, peer)
                except (Malformed, wire.WireError) as exc:
                    owner.counters["malformed"] += 1
                    log.debug("kvcore nixl: closing %s: %s", peer.address, exc)
                    return
                except Exception as exc:
                    log.warning("kvcore nixl: %s failed: %s", str(header.get("op"))[:32], exc)
                    reply, data = {"error": f"{type(exc).__name__}: {exc}"}, b""
                try:
                    wire.send(sock, reply, data)
                except OSError:
                    return
        finally:
            owner.disconnected(peer)


def _keys(body: bytes) -> list[ChunkKey]:
    try:
        return wire.split_keys(body)
    except wire.WireError as exc:
        raise Malformed(str(exc)) from None
