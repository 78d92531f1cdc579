"""The engine's side of ``kvcore server``: a :class:`~kvcore.interfaces.MemoryTier` whose
buffers are the server's shared memory.

An engine with ``KVCORE_SERVER_URL`` set uses :class:`ServerTier` as its memory tier: stores
gather straight into buffers the server reserved, loads scatter straight out of buffers it
acquired, with the same copy kernels as the in-process tier. A server that is down, slow or
restarting means misses and dropped stores, never an error or a hang: each call waits at most
``KVCORE_SERVER_TIMEOUT_S``, then the tier reconnects by itself (at most every
``KVCORE_SERVER_RETRY_S``). A restarted server is a new epoch: holds and reservations of the old
one are void, and its arena stays mapped until the last view of it is gone.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import msgspec
import numpy as np
import zmq

from kvcore.interfaces import MemoryTier, TierUsage
from kvcore.keys import ChunkKey
from kvcore.namespaces import NamespaceBook
from kvcore.planner import TierCost
from kvcore.processes import pid_namespace
from kvcore.server import protocol as p
from kvcore.server.arena import SharedArena
from kvcore.server.settings import ServerSettings

log = logging.getLogger("kvcore.server")


class ServerDown(Exception):
    """No usable answer from the server within the timeout."""


@dataclass(frozen=True)
class _Link:
    """What a reply is valid against: the arena mapped and the lease it was answered under."""

    arena: SharedArena
    lease: tuple[str, int]
    """(server epoch, Hello count): views and reservations of another lease are void."""


class _Channel:
    """One DEALER socket to the server and its sequence numbers. A ZMQ socket is used by one
    thread at a time: callers hold :attr:`lock` around :meth:`send` and :meth:`ask`."""

    def __init__(self, context: zmq.Context, address: str, timeout_s: float,
                 settle: Callable[[msgspec.Struct, object], None] | None = None) -> None:
        """``settle(request, reply)`` is given each late reply to a request that timed out
        (None: late replies are dropped)."""
        self.lock = threading.Lock()
        self.timeout_s = timeout_s
        self._seq = 0
        self._pending: dict[int, msgspec.Struct] = {}
        """Requests that timed out: their late replies are settled when they come."""
        self._settle = settle
        self.sock = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing towards a server not there
        # A send waits this long for the connection (or for room in the queue), no longer.
        self.sock.setsockopt(zmq.SNDTIMEO, int(min(0.2, timeout_s) * 1000))
        self.sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_MESSAGE_BYTES)
        self.sock.setsockopt(zmq.ROUTING_ID, uuid.uuid4().bytes)
        self.sock.connect(address)

    def send(self, request: msgspec.Struct) -> int:
        self._seq += 1
        try:
            self.sock.send_multipart([self._seq.to_bytes(8, "big"), p.encode(request)])
        except zmq.ZMQError as exc:  # not connected (IMMEDIATE), or the queue is full
            raise ServerDown(f"cannot send: {exc}") from None
        return self._seq

    def ask(self, request: msgspec.Struct, timeout_s: float | None = None) -> object:
        """The reply to ``request``, or :class:`ServerDown` after ``timeout_s`` (the
        channel's own by default)."""
        seq = self.send(request)
        wait_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + wait_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(max(1, int(left * 1000))):
                if self._settle is not None:
                    self._pending[seq] = request
                    while len(self._pending) > 1024:  # the oldest are answered or never will be
                        self._pending.pop(next(iter(self._pending)))
                raise ServerDown(f"no answer within {wait_s:g}s (KVCORE_SERVER_TIMEOUT_S)")
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                continue
            if len(frames) != 2:
                continue
            answered = int.from_bytes(frames[0], "big")
            try:
                reply = p.reply_decoder.decode(frames[1])
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue  # not from a kvcore server: ignored
            if answered == seq:
                return reply
            late = self._pending.pop(answered, None)
            if late is not None and self._settle is not None:
                self._settle(late, reply)

    def tell(self, request: msgspec.Struct) -> None:
        """A one-way request; lost (and void on the server anyway) when it is down."""
        try:
            self.send(request)
        except ServerDown:
            pass

    def close(self) -> None:
        self.sock.close(0)


class ServerTier(MemoryTier):
    """The server's shared cache, seen from one engine: its memory tier, and the tiers below
    it (:attr:`below`), which the server reads and writes behind.

    Two DEALER sockets for the tier's life, each with a fixed routing id. The first carries
    what touches the lease (reservations, holds, pings): a timeout never starts a new lease
    (the server keeps this client's holds), and every request carries a sequence number, so a
    late reply is recognised and settled (a late grant of holds or reservations is given back),
    never taken for the answer to another request. The second carries requests that reach the
    server's lower tiers (locate, fill, delete, clear...; they hold nothing), so a slow lower
    tier never delays a store or a load.
    """

    name = "server"
    shared = True
    reported = False  # the server reports its own tiers to the controller
    below: tuple[str, ...] = ()
    server_instance = ""
    """The server's instance id at the controller (empty until it says one)."""

    def __init__(self, settings: ServerSettings, budget: int = 0,
                 costs: Callable[[str], TierCost] | None = None,
                 namespaces: NamespaceBook | None = None) -> None:
        """``budget``: what :attr:`budget` says until the server tells its own; ``costs``:
        the planner's model of a tier by name, told what the server measured; ``namespaces``:
        the engine's namespaces, sent to the server when they change."""
        self.settings = settings
        self.address = p.zmq_address(settings.url)
        self.budget = budget
        self._costs = costs
        self._book = namespaces
        self._book_sent: int | None = None
        self._context: zmq.Context = zmq.Context.instance()
        self._main = _Channel(self._context, self.address, settings.timeout_s,
                              self._settle_late_locked)
        self._lock = self._main.lock
        self._slow = _Channel(self._context, self.address, settings.timeout_s)
        self._link: _Link | None = None
        self._server_memory = "cpu"
        self._hellos = 0
        self._ping_s = settings.lease_s / 3
        self._warned = False
        self._closed = threading.Event()
        self._reserved: dict[ChunkKey, tuple[str, int]] = {}
        """Key -> lease of this client's reservations."""
        self._holds: dict[int, tuple[memoryview, ChunkKey, tuple[str, int]]] = {}
        self._commits_unanswered = False
        """Whether commits were told (one way) since the main socket last had an answer."""
        self._pinger = threading.Thread(target=self._ping_loop, name="kvcore-server-ping",
                                        daemon=True)
        self._pinger.start()
        self._try(p.Ping())  # connect now when the server is up (misses until it is)

    # -- connection ----------------------------------------------------------------------------

    def _ask_locked(self, request: msgspec.Struct, timeout_s: float | None = None) -> object:
        return self._main.ask(request, timeout_s)

    def _tell_locked(self, request: msgspec.Struct) -> None:
        self._main.tell(request)

    def _settle_late_locked(self, request: msgspec.Struct, reply: object) -> None:
        """A reply to a request that timed out: give back what it granted."""
        if isinstance(request, p.Acquire) and isinstance(reply, p.Extents):
            granted = [k for k, o in zip(request.keys, reply.offsets) if o >= 0]
            if granted:
                self._tell_locked(p.Release(granted))
        elif isinstance(request, (p.Reserve, p.ReserveMany)):
            keys = [request.key] if isinstance(request, p.Reserve) else request.keys
            offsets = ([reply.offset] if isinstance(reply, p.Offset) else
                       reply.offsets if isinstance(reply, p.Extents) else [])
            for key, offset in zip(keys, offsets):
                if offset >= 0:
                    self._tell_locked(p.Abort(key))

    def _hello_locked(self) -> None:
        welcome = self._ask_locked(p.Hello(os.getpid(), pid_namespace()))
        if not isinstance(welcome, p.Welcome):
            raise ServerDown(f"unexpected answer to Hello: {welcome}")
        link = self._link
        if link is None or link.lease[0] != welcome.epoch:
            try:
                arena = SharedArena(welcome.arena, expect_group=_group_id(self.settings))
            except (OSError, ValueError) as exc:
                self._tell_locked(p.Bye())
                self._link = None
                raise ServerDown(f"cannot map the server's memory: {exc}") from None
            if arena.size != welcome.arena_bytes:
                arena.close()
                self._tell_locked(p.Bye())
                self._link = None
                raise ServerDown(f"{welcome.arena}: {arena.size} bytes, the server said "
                                 f"{welcome.arena_bytes}")
            if link is not None:
                link.arena.close()
        else:
            arena = link.arena
        self._hellos += 1
        self._link = _Link(arena, (welcome.epoch, self._hellos))
        self._server_memory = welcome.memory
        self.below = tuple(welcome.below)
        self.server_instance = welcome.instance
        self._book_sent = None  # a new server knows none of our namespaces yet
        self.budget = welcome.budget
        self._ping_s = min(self.settings.lease_s, welcome.lease_s) / 3
        if self._warned:
            log.warning("kvcore: reconnected to the kvcore server at %s", self.settings.url)
        self._warned = False

    def _call(self, request: msgspec.Struct,
              timeout_s: float | None = None) -> tuple[object, _Link]:
        """The server's answer (within ``timeout_s``, by default ``KVCORE_SERVER_TIMEOUT_S``)
        and the link it holds for, or :class:`ServerDown` (logged once until the server
        answers again)."""
        with self._lock:
            if self._closed.is_set():
                raise ServerDown("closed")
            try:
                if self._link is None:
                    self._hello_locked()
                reply = self._ask_locked(request, timeout_s)
                if isinstance(reply, p.Failed) and reply.error.startswith("say Hello"):
                    self._hello_locked()  # a new server, or our lease ended: a new lease
                    reply = self._ask_locked(request, timeout_s)
            except ServerDown as exc:
                if not self._warned:
                    self._warned = True
                    log.warning("kvcore: the kvcore server at %s is unavailable (%s); "
                                "treating it as a miss and reconnecting", self.settings.url, exc)
                raise
            link = self._link
            if link is None:
                raise ServerDown("not connected")
            if isinstance(reply, p.Failed):
                raise ServerDown(f"the server refused {type(request).__name__}: {reply.error}")
            self._commits_unanswered = False  # the server handled them before this request
            return reply, link

    def _try(self, request: msgspec.Struct) -> tuple[object, _Link] | tuple[None, None]:
        try:
            return self._call(request)
        except ServerDown:
            return None, None

    def _ask_slow(self, request: msgspec.Struct, timeout_s: float | None = None) -> object:
        """The answer to a request for the lower tiers (on the second socket), or None when
        the server is not connected, does not answer in time, or refuses it. Commits told
        on the main socket since its last answer are made certain first (one round trip
        there), so that a lookup or a delete never overtakes this engine's own stores."""
        if (self._link is None or self._commits_unanswered) and not self.ping():
            return None
        with self._slow.lock:
            if self._closed.is_set():
                return None
            try:
                reply = self._slow.ask(request, timeout_s)
            except ServerDown as exc:
                log.debug("kvcore: %s: %s", type(request).__name__, exc)
                return None
        if isinstance(reply, p.Failed):
            log.debug("kvcore: the server refused %s: %s", type(request).__name__, reply.error)
            return None
        return reply

    def _tell(self, request: msgspec.Struct, lease: tuple[str, int]) -> None:
        """A one-way request (:data:`protocol.ONE_WAY`), sent only under the lease it is
        about: nothing to wait for."""
        with self._lock:
            if (self._link is not None and self._link.lease == lease
                    and not self._closed.is_set()):
                self._tell_locked(request)

    def ping(self) -> bool:
        """Whether the server answers now (connecting first if needed)."""
        return self._try(p.Ping())[1] is not None

    def _ping_loop(self) -> None:
        last_ping = time.monotonic()
        while not self._closed.wait(min(self._ping_s, 1.0)):
            if self._link is None:
                continue
            if time.monotonic() - last_ping >= self._ping_s:
                last_ping = time.monotonic()
                self._try(p.Ping())
            self._send_namespaces()

    def _send_namespaces(self) -> None:
        """The engine's namespaces, when they changed since the server last heard them."""
        book = self._book
        if book is None or book.version == self._book_sent:
            return
        version = book.version
        notes = [p.NamespaceNote(e.namespace.model, e.namespace.dtype, e.namespace.layout,
                                 e.namespace.geometry, e.namespace.rank,
                                 e.namespace.world_size, e.namespace.tenant,
                                 list(e.served_as), e.keyed_by, declared)
                 for e, declared in book.entries_declared()]
        try:
            payload = p.Namespaces(notes[:512])
            p.request_decoder.decode(p.encode(payload))  # what the server would refuse
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            log.debug("kvcore: namespaces not sent to the server: %s", exc)
            self._book_sent = version
            return
        with self._slow.lock:
            if not self._closed.is_set():
                self._slow.tell(payload)
        self._book_sent = version

    # -- writing -------------------------------------------------------------------------------

    def reserve(self, key: ChunkKey, nbytes: int,
                parent: ChunkKey | None = None) -> np.ndarray | None:
        return self.reserve_many([key], nbytes, [parent])[0]

    def reserve_many(self, keys: Sequence[ChunkKey], nbytes: int,
                     parents: Sequence[ChunkKey | None]) -> list[np.ndarray | None]:
        keys = list(keys)
        if not keys:
            return []
        reply, link = self._try(p.ReserveMany(keys, nbytes, list(parents)))
        if link is None:
            return [None] * len(keys)
        offsets = (reply.offsets if isinstance(reply, p.Extents)
                   and len(reply.offsets) == len(keys) else [])
        out: list[np.ndarray | None] = []
        for i, key in enumerate(keys):
            offset = offsets[i] if offsets else -1
            buf = None
            if offset >= 0:
                try:
                    buf = link.arena.view(offset, nbytes)
                except ValueError as exc:
                    log.warning("kvcore: the server reserved an impossible extent: %s", exc)
            if buf is not None:
                self._reserved[key] = link.lease
            elif offset >= 0 or not offsets:
                self._tell(p.Abort(key), link.lease)  # granted but unusable: give it back
            out.append(buf)
        return out

    def commit(self, key: ChunkKey) -> None:
        lease = self._reserved.pop(key, None)
        if lease is not None:
            self._tell(p.Commit(key), lease)  # a server that restarted since lost the chunk
            self._commits_unanswered = True

    def abort(self, key: ChunkKey) -> None:
        lease = self._reserved.pop(key, None)
        if lease is not None:
            self._tell(p.Abort(key), lease)

    # -- reading -------------------------------------------------------------------------------

    def acquire(self, keys: Sequence[ChunkKey]) -> list[memoryview | None]:
        keys = list(keys)
        reply, link = self._try(p.Acquire(keys))
        if link is None:
            return [None] * len(keys)
        if (not isinstance(reply, p.Extents) or len(reply.offsets) != len(keys)
                or len(reply.sizes) != len(keys)):
            self._tell(p.Release(keys), link.lease)  # whatever it granted, given back
            return [None] * len(keys)
        out: list[memoryview | None] = []
        bad: list[ChunkKey] = []
        for key, offset, size in zip(keys, reply.offsets, reply.sizes):
            if offset < 0:
                out.append(None)
                continue
            try:
                view = link.arena.view(offset, size).data.toreadonly()
            except ValueError:
                bad.append(key)
                out.append(None)
                continue
            with self._lock:
                self._holds[id(view)] = (view, key, link.lease)
            out.append(view)
        if bad:
            self._tell(p.Release(bad), link.lease)
        return out

    def release(self, views: Sequence[memoryview | None]) -> None:
        by_lease: dict[tuple[str, int], list[ChunkKey]] = {}
        with self._lock:
            for view in views:
                held = self._holds.get(id(view)) if view is not None else None
                if held is None or held[0] is not view:
                    continue
                del self._holds[id(view)]
                by_lease.setdefault(held[2], []).append(held[1])
        for lease, keys in by_lease.items():
            self._tell(p.Release(keys), lease)  # holds of an ended lease are void

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        keys = list(keys)
        reply, _ = self._try(p.Contains(keys))
        if isinstance(reply, p.Flags) and len(reply.values) == len(keys):
            return list(reply.values)
        return [False] * len(keys)

    def touch(self, keys: Sequence[ChunkKey]) -> None:
        link = self._link
        if link is not None:
            self._tell(p.Touch(list(keys)), link.lease)

    # -- management ----------------------------------------------------------------------------

    def locate(self, keys: Sequence[ChunkKey]) -> list[str | None]:
        """Where the server holds each key (its memory tier is this one, :attr:`name`); those
        only below memory start coming up into it. The planner learns the server's tier
        costs from the answer."""
        keys = list(keys)
        reply = self._ask_slow(p.Locate(keys))
        if not isinstance(reply, p.Sources) or len(reply.where) != len(keys):
            return [None] * len(keys)
        if self._costs is not None:
            for tier, (per_chunk_s, in_flight) in reply.costs.items():
                if tier in self.below and per_chunk_s >= 0 and in_flight >= 0:
                    self._costs(tier).adopt(per_chunk_s, in_flight)
        known = set(self.below)
        names: list[str | None] = [None]
        names += [self.name if n == self._server_memory else n if n in known else None
                  for n in reply.tiers[:255]]
        return [names[w] if w < len(names) else None for w in reply.where]

    def fill(self, keys: Sequence[ChunkKey], parents: Sequence[ChunkKey | None],
             timeout_s: float) -> int:
        """Have the server bring ``keys`` up from its lower tiers (verified there), waiting at
        most ``timeout_s`` for what is already coming up."""
        keys = list(keys)
        if not self.below or not keys:
            return 0
        wait_s = min(max(timeout_s, 0.0), 600.0)
        reply = self._ask_slow(p.Fill(keys, list(parents), wait_s),
                               wait_s + self.settings.timeout_s)
        return reply.n if isinstance(reply, p.Count) else 0

    def flush(self, timeout_s: float) -> bool:
        """Wait for the server's write-behind (at most ``timeout_s``). Sent after this
        engine's commits on the same socket, so it covers them."""
        wait_s = min(max(timeout_s, 0.0), 600.0)
        try:
            reply, _ = self._call(p.Flush(wait_s), wait_s + self.settings.timeout_s)
        except ServerDown:
            return False
        return isinstance(reply, p.Flags) and reply.values == [True]

    def clear_below(self, namespace: bytes | None, tier: str | None) -> int:
        """Clear in the server: its memory tier (``tier`` this one's name), one of its lower
        tiers, or all (``None``)."""
        server_tier = self._server_memory if tier == self.name else tier
        reply = self._ask_slow(p.ClearTiers(namespace, server_tier),
                               max(30.0, self.settings.timeout_s))
        return reply.n if isinstance(reply, p.Count) else 0

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        """Remove chunks from every tier of the server."""
        reply = self._ask_slow(p.Delete(list(keys)))
        return reply.n if isinstance(reply, p.Count) else 0

    def pin(self, keys: Sequence[ChunkKey]) -> int:
        """Pin chunks in every tier of the server that pins."""
        reply = self._ask_slow(p.Pin(list(keys)))
        return reply.n if isinstance(reply, p.Count) else 0

    def unpin(self, keys: Sequence[ChunkKey]) -> int:
        reply = self._ask_slow(p.Unpin(list(keys)))
        return reply.n if isinstance(reply, p.Count) else 0

    def usage(self) -> TierUsage:
        reply, _ = self._try(p.Usage())
        if isinstance(reply, p.UsageReply):
            return TierUsage(reply.used_bytes, reply.budget_bytes, reply.chunks)
        return TierUsage(0, self.budget, 0)

    def iter_keys(self) -> Iterator[ChunkKey]:
        reply, _ = self._try(p.ListKeys())
        return iter(reply.keys if isinstance(reply, p.KeyList) else [])

    def close(self) -> None:
        """End this engine's lease: the server releases its holds and aborts its reservations
        now (it would after ``lease_s`` anyway); the arena is unmapped with its last view."""
        with self._lock:
            if self._closed.is_set():
                return
            if self._link is not None:
                self._tell_locked(p.Bye())
            self._closed.set()
            self._main.close()
            if self._link is not None:
                self._link.arena.close()
        with self._slow.lock:
            self._slow.close()
        self._pinger.join(timeout=1.0)


def _group_id(settings: ServerSettings) -> int | None:
    if not settings.group:
        return None
    import grp

    return grp.getgrnam(settings.group).gr_gid
