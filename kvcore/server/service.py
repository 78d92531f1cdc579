"""``kvcore server``: one memory tier per host in shared memory, served to every engine on it.

The server owns a :class:`~kvcore.tiers.cpu.CpuTier` whose buffers live in a
:class:`~kvcore.server.arena.SharedArena` (so the byte budget, eviction policy, pins and holds
are exactly the in-process tier's), and answers its engines on a ZMQ ROUTER socket
(:mod:`kvcore.server.protocol`). Engines write chunks straight into arena buffers they
reserved and read straight from buffers they acquired; the socket carries keys and offsets.

Each client (one DEALER socket) has a lease: what it reserved and has not committed, and what
it acquired and has not released. A client silent for ``lease_s`` (crashed, or stuck) loses
both: its reservations are aborted (nothing half written becomes visible) and its holds
released (nothing stays pinned). One thread serves every request in order, so the tier's state
changes one request at a time.
"""

from __future__ import annotations

import grp
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import zmq

from kvcore.config import Settings
from kvcore.keys import KEY_BYTES, ChunkKey
from kvcore.metrics import Metrics
from kvcore.plugins import get_registry
from kvcore.processes import pid_alive, pid_namespace
from kvcore.server import protocol as p
from kvcore.server.arena import SharedArena
from kvcore.server.settings import ServerSettings
from kvcore.tiers.cpu import CpuTier

log = logging.getLogger("kvcore.server")

ARENA_SLACK = 1 / 16
"""Arena bytes beyond the budget: each buffer is rounded up to a page."""


@dataclass
class Lease:
    """What one client holds in the tier."""

    last_seen: float = field(default_factory=time.monotonic)
    pid: int = 0
    pid_namespace: str = ""
    warned: bool = False
    reserved: set[ChunkKey] = field(default_factory=set)
    holds: dict[ChunkKey, list[memoryview]] = field(default_factory=dict)


class CacheServer:
    """The shared memory tier and its request loop. :meth:`serve` runs until :meth:`stop`."""

    def __init__(self, settings: Settings, server: ServerSettings) -> None:
        if not server.url:
            raise ValueError("KVCORE_SERVER_URL is not set: where should the server listen? "
                             "(for example unix:///run/kvcore/kvcore.sock)")
        self.settings = settings
        self.server = server
        self.address = p.zmq_address(server.url)
        self.epoch = uuid.uuid4().hex[:16]
        self.group = grp.getgrnam(server.group).gr_gid if server.group else None
        budget = int(settings.cpu_size)
        arena_path = Path(server.shm_dir) / f"kvcore-{os.getuid()}-{self.epoch}"
        self.arena = SharedArena(arena_path, int(budget * (1 + ARENA_SLACK)) + (16 << 20),
                                 create=True, group=self.group)
        policy = get_registry(settings.plugins).policy_factory(settings.eviction)()
        self.tier = CpuTier(budget, policy, allocate=self.arena.allocate, free=self.arena.free)
        self.metrics = Metrics()
        self.leases: dict[bytes, Lease] = {}
        self._pid_namespace = pid_namespace()
        self._stop = threading.Event()
        self._handlers: dict[type, Any] = {
            p.Hello: self._hello, p.Ping: lambda lease, r: p.Done(), p.Bye: self._bye,
            p.Reserve: self._reserve, p.ReserveMany: self._reserve_many,
            p.Commit: self._commit, p.Abort: self._abort,
            p.Acquire: self._acquire, p.Release: self._release,
            p.Contains: lambda lease, r: p.Flags(self.tier.contains(self._keys(r.keys))),
            p.Touch: self._touch,
            p.Delete: lambda lease, r: p.Count(self.tier.delete(self._keys(r.keys))),
            p.Pin: lambda lease, r: p.Count(self.tier.pin(self._keys(r.keys))),
            p.Unpin: lambda lease, r: p.Count(self.tier.unpin(self._keys(r.keys))),
            p.Usage: self._usage, p.ListKeys: lambda lease, r: p.KeyList(
                list(self.tier.iter_keys())[: p.MAX_KEYS]),
        }

    # -- the loop ------------------------------------------------------------------------------

    def serve(self, ready: Callable[[], None] | None = None) -> None:
        """Bind, call ``ready``, then answer requests until :meth:`stop`; the arena and socket
        are removed at the end."""
        context = zmq.Context()
        sock = context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.LINGER, 0)
        socket_path = Path(self.address.removeprefix("ipc://"))
        try:
            if not socket_path.parent.exists():
                socket_path.parent.mkdir(mode=0o700, parents=True)
                if self.group is not None:  # the group must reach the socket
                    os.chown(socket_path.parent, -1, self.group)
                    os.chmod(socket_path.parent, 0o750)
            if socket_path.exists():
                if _answers(self.address):
                    raise RuntimeError(f"another kvcore server is listening on "
                                       f"{self.server.url}")
                socket_path.unlink()  # a server that died left it behind
            old_umask = os.umask(0o077 if self.group is None else 0o007)
            try:
                sock.bind(self.address)
            finally:
                os.umask(old_umask)
            if self.group is not None:
                os.chown(socket_path, -1, self.group)
            log.info("kvcore server: listening on %s, %d-byte memory tier in %s",
                     self.address, self.tier.budget, self.arena.path)
            if ready is not None:
                ready()
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            next_reap = 0.0
            while not self._stop.is_set():
                if poller.poll(100):
                    self._serve_queued(sock)
                if time.monotonic() >= next_reap:
                    self._serve_queued(sock)  # pings that queued up meanwhile count first
                    self.reap()
                    next_reap = time.monotonic() + min(1.0, self.server.lease_s / 4)
        finally:
            sock.close()
            context.term()
            socket_path.unlink(missing_ok=True)
            self.arena.close(unlink=True)

    def _serve_queued(self, sock: zmq.Socket) -> None:
        """Answer every request waiting on the socket."""
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3 or len(frames[1]) != 8:
                self.metrics.inc("server_bad_requests_total")
                continue
            reply = self.handle(frames[0], frames[2])
            if reply is not None:
                try:
                    sock.send_multipart([frames[0], frames[1], reply], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # the client is gone (or not reading): it times out

    def stop(self) -> None:
        self._stop.set()

    def handle(self, client: bytes, payload: bytes) -> bytes | None:
        """One request's encoded reply (None for a one-way request); garbage gets a
        ``Failed`` reply, never an exception."""
        try:
            request = p.request_decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.metrics.inc("server_bad_requests_total")
            return p.encode(p.Failed(f"malformed request: {exc}"))
        one_way = isinstance(request, p.ONE_WAY)
        lease = self.leases.get(client)
        if lease is None:
            if one_way:
                return None  # its lease ended: what it commits or releases is void already
            if not isinstance(request, p.Hello):
                return p.encode(p.Failed("say Hello first (no lease: expired or unknown)"))
            lease = self.leases[client] = Lease()
        lease.last_seen = time.monotonic()
        try:
            reply = self._handlers[type(request)](lease, request)
        except ValueError as exc:
            self.metrics.inc("server_bad_requests_total")
            reply = p.Failed(str(exc))
        except Exception as exc:  # noqa: BLE001 - one request's failure never stops the server
            log.warning("kvcore server: %s failed: %s: %s", type(request).__name__,
                        type(exc).__name__, exc)
            reply = p.Failed(f"{type(exc).__name__}: {exc}")
        self.metrics.inc("server_requests_total", label=type(request).__name__.lower())
        if one_way:
            if isinstance(reply, p.Failed):
                log.debug("kvcore server: %s refused: %s", type(request).__name__, reply.error)
            return None
        return p.encode(reply)

    def reap(self) -> None:
        """End the leases of clients silent for ``lease_s`` whose process is gone (a client
        in this pid namespace whose pid is alive keeps its lease: stopped or slow, it may still
        write into what it reserved or read what it holds)."""
        now = time.monotonic()
        for client, lease in list(self.leases.items()):
            if now - lease.last_seen <= self.server.lease_s:
                continue
            if lease.pid and lease.pid_namespace == self._pid_namespace and pid_alive(lease.pid):
                if not lease.warned:
                    lease.warned = True
                    log.warning("kvcore server: client pid %d is silent but alive: keeping "
                                "its lease", lease.pid)
                continue
            self.end_lease(client)

    def end_lease(self, client: bytes, why: str = "expired") -> None:
        lease = self.leases.pop(client, None)
        if lease is None:
            return
        for key in lease.reserved:
            self.tier.abort(key)
        for views in lease.holds.values():
            self.tier.release(views)
        if lease.reserved or lease.holds:
            log.info("kvcore server: a client's lease %s: %d reservations aborted, %d "
                     "holds released", why, len(lease.reserved),
                     sum(len(v) for v in lease.holds.values()))
        self.metrics.inc("server_leases_ended_total", label=why)

    # -- requests ------------------------------------------------------------------------------

    @staticmethod
    def _keys(keys: list[bytes]) -> list[ChunkKey]:
        p.check_keys(keys)
        return keys

    def _hello(self, lease: Lease, request: p.Hello) -> p.Welcome:
        lease.pid, lease.pid_namespace = request.pid, request.pid_namespace
        return p.Welcome(arena=str(self.arena.path), arena_bytes=self.arena.size,
                         epoch=self.epoch, budget=self.tier.budget, lease_s=self.server.lease_s)

    def _bye(self, lease: Lease, request: p.Bye) -> p.Done:
        for client, held in list(self.leases.items()):
            if held is lease:
                self.end_lease(client, "ended by the client")
        return p.Done()

    def _reserve(self, lease: Lease, request: p.Reserve) -> p.Offset:
        self._keys([request.key])
        if request.parent is not None and len(request.parent) != KEY_BYTES:
            raise ValueError(f"a parent key is {KEY_BYTES} bytes")
        if not 0 < request.nbytes <= self.tier.budget:
            return p.Offset(-1)
        try:
            buf = self.tier.reserve(request.key, request.nbytes, request.parent)
        except MemoryError:  # the arena is fragmented beyond the budget check
            self.metrics.inc("server_arena_full_total")
            return p.Offset(-1)
        if buf is None:
            return p.Offset(-1)
        lease.reserved.add(request.key)
        return p.Offset(self.arena.offset_of(buf))

    def _reserve_many(self, lease: Lease, request: p.ReserveMany) -> p.Extents:
        keys = self._keys(request.keys)
        if len(request.parents) != len(keys):
            raise ValueError("one parent (or null) per key")
        offsets: list[int] = []
        try:
            for key, parent in zip(keys, request.parents):
                offsets.append(self._reserve(lease, p.Reserve(key, request.nbytes,
                                                              parent)).offset)
        except BaseException:
            for key, offset in zip(keys, offsets):  # all or nothing: no reservation leaks
                if offset >= 0:
                    self._abort(lease, p.Abort(key))
            raise
        return p.Extents(offsets, [request.nbytes if o >= 0 else 0 for o in offsets])

    def _commit(self, lease: Lease, request: p.Commit) -> p.Done | p.Failed:
        if request.key not in lease.reserved:
            return p.Failed("commit of a chunk this client did not reserve")
        lease.reserved.discard(request.key)
        self.tier.commit(request.key)
        return p.Done()

    def _abort(self, lease: Lease, request: p.Abort) -> p.Done:
        if request.key in lease.reserved:
            lease.reserved.discard(request.key)
            self.tier.abort(request.key)
        return p.Done()

    def _acquire(self, lease: Lease, request: p.Acquire) -> p.Extents:
        keys = self._keys(request.keys)
        offsets, sizes = [], []
        for key, view in zip(keys, self.tier.acquire(keys)):
            if view is None:
                offsets.append(-1)
                sizes.append(0)
                continue
            lease.holds.setdefault(key, []).append(view)
            offsets.append(self.arena.offset_of(np.frombuffer(view, dtype=np.uint8)))
            sizes.append(view.nbytes)
        return p.Extents(offsets, sizes)

    def _release(self, lease: Lease, request: p.Release) -> p.Done:
        for key in self._keys(request.keys):
            views = lease.holds.get(key)
            if views:
                self.tier.release([views.pop()])
                if not views:
                    del lease.holds[key]
        return p.Done()

    def _touch(self, lease: Lease, request: p.Touch) -> p.Done:
        self.tier.touch(self._keys(request.keys))
        return p.Done()

    def _usage(self, lease: Lease, request: p.Usage) -> p.UsageReply:
        usage = self.tier.usage()
        return p.UsageReply(usage.used_bytes, usage.budget_bytes, usage.chunks)


def _answers(address: str) -> bool:
    """Whether a server answers at ``address`` (before taking its socket over)."""
    context: zmq.Context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        sock.send_multipart([(0).to_bytes(8, "big"), p.encode(p.Ping())])
        return bool(sock.poll(500))
    finally:
        sock.close(0)


def run_server(settings: Settings, server: ServerSettings) -> None:
    """``kvcore server``: serve until SIGTERM or SIGINT."""
    service = CacheServer(settings, server)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: service.stop())
    service.serve(lambda: print(f"kvcore server: listening on {server.url}", flush=True))
