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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import msgspec
import numpy as np
import zmq

from kvcore.interfaces import MemoryTier, TierUsage
from kvcore.keys import ChunkKey
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


class ServerTier(MemoryTier):
    """The server's shared memory tier, seen from one engine.

    One DEALER socket for the tier's life, with a fixed routing id: a timeout never starts a
    new lease (the server keeps this client's holds), and every request carries a sequence
    number, so a late reply is recognised and settled (a late grant of holds or reservations is
    given back), never taken for the answer to another request.
    """

    name = "server"

    def __init__(self, settings: ServerSettings, budget: int = 0) -> None:
        """``budget``: what :attr:`budget` says until the server tells its own."""
        self.settings = settings
        self.address = p.zmq_address(settings.url)
        self.budget = budget
        self._context: zmq.Context = zmq.Context.instance()
        self._lock = threading.Lock()
        self._seq = 0
        self._pending: dict[int, msgspec.Struct] = {}
        """Requests that timed out: their late replies are settled when they come."""
        self._link: _Link | None = None
        self._hellos = 0
        self._ping_s = settings.lease_s / 3
        self._warned = False
        self._closed = threading.Event()
        self._sock = self._new_socket()
        self._reserved: dict[ChunkKey, tuple[str, int]] = {}
        """Key -> lease of this client's reservations."""
        self._holds: dict[int, tuple[memoryview, ChunkKey, tuple[str, int]]] = {}
        self._pinger = threading.Thread(target=self._ping_loop, name="kvcore-server-ping",
                                        daemon=True)
        self._pinger.start()
        self._try(p.Ping())  # connect now when the server is up (misses until it is)

    # -- connection ----------------------------------------------------------------------------

    def _new_socket(self) -> zmq.Socket:
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing towards a server that is not there
        # A send waits this long for the connection (or for room in the queue), no longer.
        sock.setsockopt(zmq.SNDTIMEO, int(min(0.2, self.settings.timeout_s) * 1000))
        sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.ROUTING_ID, uuid.uuid4().bytes)
        sock.connect(self.address)
        return sock

    def _send_locked(self, request: msgspec.Struct) -> int:
        self._seq += 1
        try:
            self._sock.send_multipart([self._seq.to_bytes(8, "big"), p.encode(request)])
        except zmq.ZMQError as exc:  # not connected (IMMEDIATE), or the queue is full
            raise ServerDown(f"cannot send: {exc}") from None
        return self._seq

    def _ask_locked(self, request: msgspec.Struct) -> object:
        seq = self._send_locked(request)
        deadline = time.monotonic() + self.settings.timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sock.poll(max(1, int(left * 1000))):
                self._pending[seq] = request
                while len(self._pending) > 1024:  # the oldest are answered or never will be
                    self._pending.pop(next(iter(self._pending)))
                raise ServerDown(f"no answer within {self.settings.timeout_s}s "
                                 "(KVCORE_SERVER_TIMEOUT_S)")
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
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
            self._settle_late_locked(answered, reply)

    def _settle_late_locked(self, seq: int, reply: object) -> None:
        """A reply to a request that timed out: give back what it granted."""
        request = self._pending.pop(seq, None)
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
        self.budget = welcome.budget
        self._ping_s = min(self.settings.lease_s, welcome.lease_s) / 3
        if self._warned:
            log.warning("kvcore: reconnected to the kvcore server at %s", self.settings.url)
        self._warned = False

    def _call(self, request: msgspec.Struct) -> tuple[object, _Link]:
        """The server's answer and the link it holds for, or :class:`ServerDown` (logged once
        until the server answers again)."""
        with self._lock:
            if self._closed.is_set():
                raise ServerDown("closed")
            try:
                if self._link is None:
                    self._hello_locked()
                reply = self._ask_locked(request)
                if isinstance(reply, p.Failed) and reply.error.startswith("say Hello"):
                    self._hello_locked()  # a new server, or our lease ended: a new lease
                    reply = self._ask_locked(request)
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
            return reply, link

    def _try(self, request: msgspec.Struct) -> tuple[object, _Link] | tuple[None, None]:
        try:
            return self._call(request)
        except ServerDown:
            return None, None

    def _tell_locked(self, request: msgspec.Struct) -> None:
        try:
            self._send_locked(request)
        except ServerDown:
            pass  # the server is gone: what this gives back is void there anyway

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
        while not self._closed.wait(self._ping_s):
            if self._link is not None:
                self._try(p.Ping())

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

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        reply, _ = self._try(p.Delete(list(keys)))
        return reply.n if isinstance(reply, p.Count) else 0

    def pin(self, keys: Sequence[ChunkKey]) -> int:
        reply, _ = self._try(p.Pin(list(keys)))
        return reply.n if isinstance(reply, p.Count) else 0

    def unpin(self, keys: Sequence[ChunkKey]) -> int:
        reply, _ = self._try(p.Unpin(list(keys)))
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
            self._sock.close(0)
            if self._link is not None:
                self._link.arena.close()
        self._pinger.join(timeout=1.0)


def _group_id(settings: ServerSettings) -> int | None:
    if not settings.group:
        return None
    import grp

    return grp.getgrnam(settings.group).gr_gid
