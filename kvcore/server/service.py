"""``kvcore server``: one cache per host, its memory tier in shared memory, served to every
engine on it.

The server runs a :class:`~kvcore.engine.CacheEngine` whose memory tier is a
:class:`~kvcore.tiers.cpu.CpuTier` with its buffers in a :class:`~kvcore.server.arena.SharedArena`
(so the byte budget, eviction policy, pins and holds are exactly the in-process tier's), and
whose lower tiers, write-behind, controller reporter and KV events are the ones
``KVCORE_TIERS`` and the other settings give: one set per host. It answers its engines on a ZMQ
ROUTER socket (:mod:`kvcore.server.protocol`). Engines write chunks straight into arena
buffers they reserved and read straight from buffers they acquired; the socket carries keys
and offsets. A committed chunk is written behind by the server.

Each client (one DEALER socket) has a lease: what it reserved and has not committed, and what
it acquired and has not released. A client silent for ``lease_s`` (crashed, or stuck) loses
both: its reservations are aborted (nothing half written becomes visible) and its holds
released (nothing stays pinned). One thread serves the memory tier's requests in order, so its
state changes one request at a time; requests that reach the lower tiers (``LEASELESS``: locate,
fill, delete, clear...) run in a small pool and are answered when done, so a slow tier never
delays a store or a load.
"""

from __future__ import annotations

import fcntl
import grp
import logging
import os
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import zmq

from kvcore.config import Settings
from kvcore.engine import CacheEngine
from kvcore.keys import KEY_BYTES, ChunkKey, Namespace
from kvcore.plugins import get_registry
from kvcore.processes import pid_alive, pid_namespace
from kvcore.server import protocol as p
from kvcore.server.arena import SharedArena
from kvcore.server.settings import ServerSettings
from kvcore.tiers.cpu import CpuTier

log = logging.getLogger("kvcore.server")

ARENA_SLACK = 1 / 16
"""Arena bytes beyond the budget: each buffer is rounded up to a page."""
MAX_DEFERRED = 256
"""Lower-tier requests queued or running at once; past it a request is refused (a miss)."""


@dataclass
class Lease:
    """What one client holds in the tier."""

    last_seen: float = field(default_factory=time.monotonic)
    pid: int = 0
    pid_namespace: str = ""
    warned: bool = False
    reserved: set[ChunkKey] = field(default_factory=set)
    holds: dict[ChunkKey, list[memoryview]] = field(default_factory=dict)


@dataclass
class _Deferred:
    """A request answered from the pool (it reaches the lower tiers)."""

    run: Callable[[], msgspec.Struct]


class CacheServer:
    """The shared cache and its request loop. :meth:`serve` runs until :meth:`stop`."""

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
        prefix = f"kvcore-{os.getuid()}-"
        for stale in remove_stale_arenas(Path(server.shm_dir), prefix):
            log.info("kvcore server: removed %s, left by a server that is gone", stale)
        self.arena = SharedArena(Path(server.shm_dir) / f"{prefix}{self.epoch}",
                                 int(budget * (1 + ARENA_SLACK)) + (16 << 20),
                                 create=True, group=self.group, lock=True)
        try:
            policy = get_registry(settings.plugins).policy_factory(settings.eviction)()
            self.tier = CpuTier(budget, policy, allocate=self.arena.allocate,
                                free=self.arena.free)
            self.tier.name = settings.tiers[0]
            self.engine = CacheEngine(settings, memory=self.tier, role="cache-server")
            """The host's cache: lower tiers, write-behind, reporter and KV events included."""
        except BaseException:
            self.arena.close(unlink=True)
            raise
        self.metrics = self.engine.metrics
        self.leases: dict[bytes, Lease] = {}
        self._no_lease = Lease()
        """What requests that hold nothing (``LEASELESS``) are handled under."""
        self._pid_namespace = pid_namespace()
        self._stop = threading.Event()
        self._committed: list[ChunkKey] = []
        """Chunks committed since the last batch was handed to write-behind."""
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kvcore-server")
        self._answers: queue.SimpleQueue[list[bytes]] = queue.SimpleQueue()
        self._deferred = 0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.engine.stats_sections["clients"] = self.clients
        self._handlers: dict[type, Any] = {
            p.Hello: self._hello, p.Ping: lambda lease, r: p.Done(), p.Bye: self._bye,
            p.Reserve: self._reserve, p.ReserveMany: self._reserve_many,
            p.Commit: self._commit, p.Abort: self._abort,
            p.Acquire: self._acquire, p.Release: self._release,
            p.Contains: lambda lease, r: p.Flags(self.tier.contains(self._keys(r.keys))),
            p.Touch: self._touch,
            p.Delete: lambda lease, r: self._below(
                lambda: p.Count(self.engine.delete(self._keys(r.keys)))),
            p.Pin: lambda lease, r: self._below(
                lambda: p.Count(self.engine.pin(self._keys(r.keys)))),
            p.Unpin: lambda lease, r: self._below(
                lambda: p.Count(self.engine.unpin(self._keys(r.keys)))),
            p.Usage: self._usage, p.ListKeys: lambda lease, r: p.KeyList(
                list(self.tier.iter_keys())[: p.MAX_KEYS]),
            p.Locate: self._locate, p.Fill: self._fill, p.ClearTiers: self._clear,
            p.Flush: lambda lease, r: self._below(
                lambda: p.Flags([self.engine.pipeline.flush(r.wait_s)])),
            p.Namespaces: self._namespaces,
        }

    # -- the loop ------------------------------------------------------------------------------

    def serve(self, ready: Callable[[], None] | None = None) -> None:
        """Bind, call ``ready``, then answer requests until :meth:`stop`; the engine, the
        arena and the socket are closed and removed at the end."""
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
            log.info("kvcore server: listening on %s, %d-byte memory tier in %s, tiers %s",
                     self.address, self.tier.budget, self.arena.path,
                     ",".join(t.name for t in self.engine.tiers))
            if ready is not None:
                ready()
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(self._wake_r, zmq.POLLIN)
            next_reap = 0.0
            while not self._stop.is_set():
                if poller.poll(100):
                    self._serve_queued(sock)
                    self._send_answers(sock)
                if time.monotonic() >= next_reap:
                    self._serve_queued(sock)  # pings that queued up meanwhile count first
                    self.reap()
                    next_reap = time.monotonic() + min(1.0, self.server.lease_s / 4)
        finally:
            sock.close()
            context.term()
            socket_path.unlink(missing_ok=True)
            self._pool.shutdown(wait=False, cancel_futures=True)
            self.engine.close()
            self.arena.close(unlink=True)
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _serve_queued(self, sock: zmq.Socket) -> None:
        """Answer every request waiting on the socket (those for the lower tiers go to the
        pool); then hand the chunks committed meanwhile to write-behind."""
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if len(frames) != 3 or len(frames[1]) != 8:
                self.metrics.inc("server_bad_requests_total")
                continue
            reply = self.handle(frames[0], frames[2])
            if isinstance(reply, _Deferred):
                self._defer(reply, frames[0], frames[1])
            elif reply is not None:
                _send(sock, [frames[0], frames[1], reply])
        self._write_behind()

    def _write_behind(self) -> None:
        """Hand the chunks committed since the last call to write-behind."""
        if self._committed:
            committed, self._committed = self._committed, []
            self.engine.pipeline.stored(committed)

    def _defer(self, request: _Deferred, client: bytes, seq: bytes) -> None:
        self._write_behind()  # a flush (or a locate) after commits sees them queued

        def run() -> None:
            self._answers.put([client, seq, self._encode_reply(request.run)])
            try:
                os.write(self._wake_w, b"!")
            except BlockingIOError:
                pass  # the loop has wake-ups pending already

        self._deferred += 1
        self._pool.submit(run)

    def _send_answers(self, sock: zmq.Socket) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                frames = self._answers.get_nowait()
            except queue.Empty:
                return
            self._deferred -= 1
            _send(sock, frames)

    def stop(self) -> None:
        self._stop.set()

    def handle(self, client: bytes, payload: bytes) -> bytes | None | _Deferred:
        """One request's encoded reply: None for a one-way request, a :class:`_Deferred` for
        one the pool answers; garbage gets a ``Failed`` reply, never an exception."""
        try:
            request = p.request_decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.metrics.inc("server_bad_requests_total")
            return p.encode(p.Failed(f"malformed request: {exc}"))
        one_way = isinstance(request, p.ONE_WAY)
        self.metrics.inc("server_requests_total", label=type(request).__name__.lower())
        if isinstance(request, p.LEASELESS):
            lease = self._no_lease  # these hold nothing
        else:
            lease = self.leases.get(client)  # type: ignore[assignment]
            if lease is None:
                if one_way:
                    return None  # its lease ended: what it commits or releases is void already
                if not isinstance(request, p.Hello):
                    return p.encode(p.Failed("say Hello first (no lease: expired or unknown)"))
                lease = self.leases[client] = Lease()
            lease.last_seen = time.monotonic()
        handler = self._handlers[type(request)]
        if one_way:
            self._run(handler, lease, request)  # a refusal is logged, not answered
            return None
        reply = self._encode_reply(handler, lease, request)
        if isinstance(reply, _Deferred) and self._deferred >= MAX_DEFERRED:
            self.metrics.inc("server_busy_total")
            return p.encode(p.Failed("busy: too many lower-tier requests queued"))
        return reply

    def _run(self, run: Callable[..., Any], *args: Any) -> Any:
        """``run(*args)``'s reply; a failure is a ``Failed`` reply (logged at DEBUG)."""
        try:
            reply = run(*args)
        except ValueError as exc:
            self.metrics.inc("server_bad_requests_total")
            reply = p.Failed(str(exc))
        except Exception as exc:  # noqa: BLE001 - one request's failure never stops the server
            log.warning("kvcore server: a request failed: %s: %s", type(exc).__name__, exc)
            reply = p.Failed(f"{type(exc).__name__}: {exc}")
        if isinstance(reply, p.Failed):
            log.debug("kvcore server: request refused: %s", reply.error)
        return reply

    def _encode_reply(self, run: Callable[..., Any], *args: Any) -> Any:
        """``run(*args)``'s reply encoded (a :class:`_Deferred` as it is)."""
        reply = self._run(run, *args)
        return reply if isinstance(reply, _Deferred) else p.encode(reply)

    def clients(self) -> list[dict[str, Any]]:
        """The engines attached now (the controller lists them with the server)."""
        now = time.monotonic()
        return [{"pid": lease.pid, "idle_s": round(now - lease.last_seen, 3),
                 "reserved": len(lease.reserved),
                 "holds": sum(len(v) for v in lease.holds.values())}
                for lease in list(self.leases.values())]

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
        reporter = self.engine.attachments.get("controller")
        return p.Welcome(arena=str(self.arena.path), arena_bytes=self.arena.size,
                         epoch=self.epoch, budget=self.tier.budget, lease_s=self.server.lease_s,
                         below=[t.name for t in self.engine.lower], memory=self.tier.name,
                         instance=str(getattr(reporter, "instance_id", "")))

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
        self._committed.append(request.key)
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

    # -- requests that reach the lower tiers ---------------------------------------------------

    def _below(self, run: Callable[[], msgspec.Struct]) -> msgspec.Struct | _Deferred:
        """``run`` now when the server has no lower tiers (memory only: fast), else in the
        pool."""
        return _Deferred(run) if self.engine.lower else run()

    def _locate(self, lease: Lease, request: p.Locate) -> msgspec.Struct | _Deferred:
        keys = self._keys(request.keys)
        return self._below(lambda: self._sources(keys))

    def _sources(self, keys: list[ChunkKey]) -> p.Sources:
        """Where each key is; chunks asked for again are written behind (when admission waits
        for that), and those found only below memory start coming up."""
        engine = self.engine
        source = engine.stack.locate(keys)
        found = next((i for i, s in enumerate(source) if s is None), len(keys))
        costs: dict[str, tuple[float, int]] = {}
        if engine.lower:
            in_memory = [k for k, s in zip(keys[:found], source[:found]) if s == self.tier.name]
            again = set(engine.pipeline.admission.asked(keys, found))
            engine.pipeline.copy_down([k for k in in_memory if k in again])
            below = [i for i in range(found) if source[i] != self.tier.name]
            if below:
                engine.pipeline.prefetch([keys[i] for i in below],
                                         {keys[i]: (keys[i - 1] if i else None) for i in below})
            for tier in engine.lower:
                cost = engine.planner.tier(tier.name)
                if cost.per_chunk_s is not None:
                    costs[tier.name] = (cost.per_chunk_s, cost.in_flight)
        tiers = [t.name for t in engine.tiers]
        index = {name: i + 1 for i, name in enumerate(tiers)}
        return p.Sources(tiers, bytes(index.get(s, 0) if s else 0 for s in source), costs)

    def _fill(self, lease: Lease, request: p.Fill) -> msgspec.Struct | _Deferred:
        keys = self._keys(request.keys)
        if len(request.parents) != len(keys):
            raise ValueError("one parent (or null) per key")
        if not self.engine.lower:
            return p.Count(0)
        parents = dict(zip(keys, request.parents))

        def fill() -> p.Count:
            self.engine.pipeline.wait_inflight(keys, request.wait_s)
            return p.Count(self.engine.stack.promote(keys, parents))

        return _Deferred(fill)

    def _clear(self, lease: Lease, request: p.ClearTiers) -> msgspec.Struct | _Deferred:
        names = [t.name for t in self.engine.tiers]
        if request.tier is not None and request.tier not in names:
            raise ValueError(f"no tier {request.tier!r} here (tiers: {', '.join(names)})")
        return self._below(lambda: p.Count(self.engine.clear(request.namespace, request.tier)))

    def _namespaces(self, lease: Lease, request: p.Namespaces) -> p.Done:
        """An engine's namespaces, declared here too (codecs, the controller's listing)."""
        for note in request.entries:
            namespace = Namespace(note.model, note.dtype, note.layout, note.geometry, note.rank,
                                  note.world_size, note.tenant)
            if note.declared:
                self.engine.declare_namespace(namespace, note.served_as, note.keyed_by)
            else:
                self.engine.note_namespace(namespace)
        return p.Done()


def _send(sock: zmq.Socket, frames: list[bytes]) -> None:
    try:
        sock.send_multipart(frames, zmq.NOBLOCK)
    except zmq.ZMQError:
        pass  # the client is gone (or not reading): it times out


def remove_stale_arenas(directory: Path, prefix: str, min_age_s: float = 60.0) -> list[Path]:
    """Remove arena files under ``directory`` named ``prefix*`` that no server holds (each
    server keeps a lock on its own; one that died has released it), leaving any younger than
    ``min_age_s`` (a server that is starting now). The paths removed."""
    removed = []
    for path in directory.glob(prefix + "*"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            info = os.fstat(fd)
            if (not os.path.samestat(info, os.lstat(path)) or info.st_uid != os.geteuid()
                    or time.time() - info.st_mtime < min_age_s):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live server's
            path.unlink(missing_ok=True)
            removed.append(path)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


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
