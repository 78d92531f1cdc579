"""The reading side: ask one peer what it holds and READ chunk bytes from its memory.

One :class:`PeerClient` per peer address. A read is one lease on the side channel, one local
registration of a fresh receive buffer, one NIXL READ of all leased chunks (its completion
notification tells the server to end the lease) and one deregistration. Every failure
(refused, closed, malformed, transfer error, deadline passed) gives misses, never an exception
to the caller of :meth:`PeerClient.read`; a failed peer is skipped for ``retry_s``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import weakref
from typing import Any

import numpy as np

from kvcore import chunk_format
from kvcore.failures import FailureLog
from kvcore.keys import ChunkKey
from kvcore_nixl import auth, wire
from kvcore_nixl.agent import Agent, address_of
from kvcore_nixl.server import DONE_PREFIX
from kvcore_nixl.settings import split_address

log = logging.getLogger("kvcore.nixl.client")
_GRAVEYARD: list[np.ndarray] = []
POLL_S = 0.0001
"""Pause between polls of a transfer in flight."""


_CLOSED = (wire.Closed, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
"""What a kept connection that the server closed meanwhile raises (retried once; a timeout is
not)."""


class PeerError(ConnectionError):
    """The peer could not answer."""


class ReceivePool:
    """Registered receive buffers, reused once every view of a read's result is gone.

    A fresh buffer per read would pay page faults and a registration each time; a buffer comes
    back here when the last view handed out from it is garbage-collected (``weakref.finalize``
    on a per-read array), and stays registered while it waits. At most ``keep_bytes`` wait.
    """

    def __init__(self, agent: Agent, keep_bytes: int = 1 << 30) -> None:
        self.agent = agent
        self.keep_bytes = keep_bytes
        self._free: dict[int, list[tuple[np.ndarray, Any]]] = {}
        self._free_bytes = 0
        self._lock = threading.Lock()
        self._closed = False

    def take(self, nbytes: int) -> tuple[np.ndarray, Any]:
        """A registered buffer of exactly ``nbytes``: (array, registration)."""
        with self._lock:
            blocks = self._free.get(nbytes)
            if blocks:
                self._free_bytes -= nbytes
                return blocks.pop()
        block = np.empty(nbytes, dtype=np.uint8)
        return block, self.agent.register([(address_of(block), nbytes)])

    def lend(self, block: np.ndarray, descs: Any) -> np.ndarray:
        """A view of ``block`` whose collection gives ``block`` back to the pool."""
        view = block.view()
        weakref.finalize(view, self.give, block, descs)
        return view

    def give(self, block: np.ndarray, descs: Any) -> None:
        with self._lock:
            if not self._closed and self._free_bytes + block.nbytes <= self.keep_bytes:
                self._free.setdefault(block.nbytes, []).append((block, descs))
                self._free_bytes += block.nbytes
                return
        self.agent.deregister(descs)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            blocks = [b for lst in self._free.values() for b in lst]
            self._free.clear()
            self._free_bytes = 0
        for _, descs in blocks:
            self.agent.deregister(descs)


class PeerClient:
    """Side channel and NIXL reads towards one peer. Thread-safe (one request at a time)."""

    def __init__(
        self, address: str, agent: Agent, timeout_s: float = 4.0,
        connect_timeout_s: float = 0.5, retry_s: float = 2.0, secret: bytes | None = None,
        max_read_bytes: int = 4 << 30,
    ) -> None:
        """``secret``: KVCORE_NIXL_SECRET; with it the peer must prove it too (see
        :mod:`kvcore_nixl.auth`), without it only a peer that does not ask is read from."""
        self.address = address
        self.secret = secret or None
        self.agent = agent
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.retry_s = retry_s
        self.remote_agent: str | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._down_until = 0.0
        self.pool = ReceivePool(agent)
        self._stuck: list[tuple[Any, Any, np.ndarray]] = []
        """Transfers that could not be cancelled yet: (handle, registration, buffer)."""
        self._stuck_lock = threading.Lock()
        self.max_read_bytes = max_read_bytes
        """Largest total one read may allocate (a peer's lease answer is bounded before any
        buffer is taken)."""
        self.failures = FailureLog(log, "treated as a miss", prefix="kvcore nixl: ")
        """Chunks read from this peer that did not verify (counted, each kind logged once)."""

    # -- side channel --------------------------------------------------------------------------

    def request(self, header: dict[str, Any], body: bytes = b"") -> tuple[dict[str, Any], bytes]:
        """One request/answer; raises :class:`PeerError` (and marks the peer down) on failure."""
        with self._lock:
            if time.monotonic() < self._down_until:
                raise PeerError(f"peer {self.address} is marked down")
            for attempt in (0, 1):
                reused = self._sock is not None
                try:
                    sock = self._connected()
                    wire.send(sock, header, body)
                    reply, data = wire.recv(sock)
                    break
                except (OSError, wire.WireError, ValueError) as exc:
                    # A kept connection the server closed meanwhile (idle timeout): once more
                    # on a fresh one before the peer counts as down.
                    retry = reused and not attempt and isinstance(exc, _CLOSED)
                    self._disconnect(down=not retry)
                    if not retry:
                        raise PeerError(
                            f"peer {self.address}: {type(exc).__name__}: {exc}") from None
        if "error" in reply:
            raise PeerError(f"peer {self.address}: {reply['error']}")
        return reply, data

    def _connected(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        host, port = split_address(self.address)
        sock = socket.create_connection((host, port), timeout=self.connect_timeout_s)
        sock.settimeout(self.timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            client_nonce = auth.nonce()
            wire.send(sock, {"op": "hello", "nonce": client_nonce, "agent": self.agent.name})
            reply, metadata = wire.recv(sock)
            if "challenge" in reply:
                server_nonce = reply["challenge"]
                if self.secret is None:
                    raise wire.WireError("the peer requires KVCORE_NIXL_SECRET; none is set")
                if not auth.valid_nonce(server_nonce) or not auth.check(
                        auth.server_proof(self.secret, client_nonce, server_nonce),
                        reply.get("proof")):
                    raise wire.WireError("the peer could not prove KVCORE_NIXL_SECRET")
                wire.send(sock, {"op": "auth", "proof": auth.client_proof(
                    self.secret, client_nonce, server_nonce)})
                reply, metadata = wire.recv(sock)
            elif self.secret is not None:
                raise wire.WireError("the peer does not authenticate (no KVCORE_NIXL_SECRET "
                                     "there); refusing to read from it")
            if self.remote_agent is not None:
                self._forget_remote()
            self.remote_agent = self.agent.nixl.add_remote_agent(metadata).decode()
            if self.remote_agent != reply.get("agent"):
                raise wire.WireError("agent name does not match its metadata")
        except Exception:
            sock.close()
            raise
        self._sock = sock
        return sock

    def _disconnect(self, down: bool) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if down:
            self._down_until = time.monotonic() + self.retry_s

    def _forget_remote(self) -> None:
        if self.remote_agent is not None:
            try:
                self.agent.nixl.remove_remote_agent(self.remote_agent)
            except Exception:
                pass
            self.remote_agent = None

    # -- operations ----------------------------------------------------------------------------

    def contains(self, keys: list[ChunkKey]) -> list[bool]:
        reply, _ = self.request({"op": "contains"}, b"".join(keys))
        hits = reply.get("hits")
        if not isinstance(hits, list) or len(hits) != len(keys):
            raise PeerError(f"peer {self.address}: malformed contains answer")
        return [bool(h) for h in hits]

    def stats(self) -> dict[str, Any]:
        return self.request({"op": "stats"})[0]

    def read(self, keys: list[ChunkKey], timeout_s: float | None = None) -> list[memoryview | None]:
        """Chunk bytes for ``keys`` (``None`` where the peer lacks one or anything failed)."""
        misses: list[memoryview | None] = [None] * len(keys)
        if not keys:
            return misses
        self._retry_stuck()
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        try:
            reply, metadata = self.request({"op": "lease"}, b"".join(keys))
        except PeerError as exc:
            log.debug("kvcore nixl: %s", exc)
            return misses
        lease_id, chunks = reply.get("lease"), reply.get("chunks")
        if not lease_id or not isinstance(chunks, list) or len(chunks) != len(keys):
            return misses
        try:
            return self._read_leased(lease_id, keys, chunks, metadata, deadline)
        except Exception as exc:
            log.warning("kvcore nixl: read from %s failed: %s", self.address, exc)
            self._release(lease_id)
            return misses

    def _read_leased(
        self, lease_id: int, keys: list[ChunkKey], chunks: list[Any], metadata: bytes,
        deadline: float,
    ) -> list[memoryview | None]:
        entries = [self._checked(c) if c is not None else None for c in chunks]
        remote = [(c[0], c[1]) for c in entries if c is not None]
        total = sum(n for _, n in remote)
        if total > self.max_read_bytes:
            raise PeerError(f"peer {self.address} offered {total} bytes, more than one read "
                            f"may take ({self.max_read_bytes}; the memory tier's budget)")
        block, descs = self.pool.take(max(total, 1))
        base = address_of(block)
        local, offset = [], 0
        for _, n in remote:
            local.append((base + offset, n))
            offset += n
        self.agent.nixl.add_remote_agent(metadata)
        handle = None
        ok = False
        try:
            handle = self.agent.nixl.initialize_xfer(
                "READ", self.agent.xfer_descs(local), self.agent.xfer_descs(remote),
                self.remote_agent, DONE_PREFIX + str(lease_id).encode(),
            )
            state = self.agent.nixl.transfer(handle)
            ok = self._wait(handle, state, deadline)
        except Exception:
            self._finish(handle, block, descs, reuse=False)
            raise
        if not self._finish(handle, block, descs, reuse=ok):
            ok = False
        if not ok:
            self._release(lease_id)
            return [None] * len(entries)
        buffer = self.pool.lend(block, descs)
        out: list[memoryview | None] = []
        view, offset = buffer.data, 0
        for key, entry in zip(keys, entries):
            if entry is None:
                out.append(None)
                continue
            part = view[offset : offset + entry[1]]
            offset += entry[1]
            if chunk_format.matches(key, entry[2], part):
                out.append(part)
                continue
            self.failures.record(f"verifying a chunk from {self.address}",
                                 "it does not match its frame (key, length, checksum)")
            out.append(None)
        return out

    def _checked(self, chunk: Any) -> tuple[int, int, bytes]:
        """One lease entry, ``[address, length, frame header as hex]``: a non-negative address,
        a length of at least 1 within :attr:`max_read_bytes`, a header of
        :data:`~kvcore.chunk_format.HEADER_BYTES`; anything else is a malformed answer."""
        try:
            address, length, header_hex = chunk
            header = bytes.fromhex(header_hex)
            valid = (type(address) is int and type(length) is int and address >= 0
                     and 0 < length <= self.max_read_bytes
                     and len(header) == chunk_format.HEADER_BYTES)
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise PeerError(f"peer {self.address}: malformed lease entry {str(chunk)[:80]}")
        return address, length, header

    def _wait(self, handle: Any, state: str, deadline: float) -> bool:
        """Poll the transfer until it ends. Each poll also drives NIXL's progress (there is no
        progress thread by default, see :mod:`kvcore_nixl.agent`), so the pause stays short."""
        while state == "PROC":
            if time.monotonic() > deadline:
                log.warning("kvcore nixl: transfer from %s timed out", self.address)
                return False
            time.sleep(POLL_S)
            state = self.agent.nixl.check_xfer_state(handle)
        if state != "DONE":
            log.warning("kvcore nixl: transfer from %s failed (%s)", self.address, state)
            with self._lock:
                self._disconnect(down=True)
        return state == "DONE"

    def _finish(self, handle: Any, block: np.ndarray, descs: Any, reuse: bool) -> bool:
        """Release the transfer; give the buffer back unless NIXL cannot cancel it yet.

        Returns whether the block may be handed out (``reuse`` and the release succeeded).
        """
        if handle is not None:
            try:
                handle.release()
            except Exception:
                with self._stuck_lock:
                    self._stuck.append((handle, descs, block))
                return False
        if not reuse:
            self.agent.deregister(descs)
        return reuse

    def _retry_stuck(self, force: bool = False) -> None:
        with self._stuck_lock:
            stuck, self._stuck = self._stuck, []
        for handle, descs, buffer in stuck:
            try:
                handle.release()
            except Exception:
                if not force:
                    with self._stuck_lock:
                        self._stuck.append((handle, descs, buffer))
                    continue
                _GRAVEYARD.append(buffer)  # never free memory a transfer may still write
            self.agent.deregister(descs)

    def _release(self, lease_id: int) -> None:
        try:
            self.request({"op": "release", "lease": lease_id})
        except PeerError:
            pass  # the server ends the lease on its own after lease_timeout_s

    @property
    def corrupt(self) -> int:
        """Chunks read from this peer that did not verify against their frame (misses)."""
        return self.failures.count

    def close(self) -> None:
        """Deregister everything this client registered (buffers still lent out follow later)."""
        self._retry_stuck(force=True)
        self.pool.close()
        with self._lock:
            self._disconnect(down=False)
            self._forget_remote()
