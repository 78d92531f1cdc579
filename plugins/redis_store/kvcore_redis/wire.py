"""Pipelines of GET and SET that move chunk bytes with as few copies as the socket allows.

redis-py packs each argument from one buffer, so a framed chunk (a 56-byte header and a payload
view) would have to be joined before a SET: a fresh multi-MiB allocation per chunk, costlier than
the send on loopback. Its pure-Python reply parser reads a multi-MiB bulk reply 32 KiB at a time
through a BytesIO. Here commands are written in RESP from the caller's buffers, and bulk replies
are received straight into one buffer of their exact size (``recv_into``). Connections still come
from, and go back to, redis-py's pool, with its timeouts, TLS and authentication.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kvcore.interfaces import Buffer

_SMALL = 64 * 1024
_RECV = 256 * 1024


def pack_set(name: bytes, value: Sequence[Buffer], px: int | None) -> list[Buffer]:
    """RESP for ``SET name <value parts concatenated> [PX px]``."""
    views = [memoryview(v).cast("B") for v in value]
    total = sum(v.nbytes for v in views)
    head = b"*%d\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (5 if px else 3, len(name), name, total)
    tail = b"\r\n"
    if px:
        tail += _bulk(b"PX") + _bulk(b"%d" % px)
    return [head, *views, tail]


def pack_get(name: bytes, px: int | None) -> list[Buffer]:
    """RESP for ``GET name``, or ``GETEX name PX px`` (a read that renews the TTL)."""
    if px:
        return [b"*4\r\n" + _bulk(b"GETEX") + _bulk(name) + _bulk(b"PX") + _bulk(b"%d" % px)]
    return [b"*2\r\n$3\r\nGET\r\n" + _bulk(name)]


def pack_command(*args: bytes) -> list[Buffer]:
    """RESP for a command of small arguments (``EXISTS name``)."""
    return [b"*%d\r\n" % len(args) + b"".join(_bulk(a) for a in args)]


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


def coalesce(buffers: list[Buffer]) -> list[Buffer]:
    """Join runs of small buffers so the socket sees few, large writes."""
    out: list[Buffer] = []
    small: list[Buffer] = []
    for buf in buffers:
        if memoryview(buf).nbytes < _SMALL:
            small.append(buf)
            continue
        if small:
            out.append(b"".join(small))
            small = []
        out.append(buf)
    if small:
        out.append(b"".join(small))
    return out


class RespReader:
    """Reads RESP replies from a socket; a bulk reply lands in a bytearray of its exact size."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.pos = 0

    def _fill(self) -> None:
        chunk = self.sock.recv(_RECV)
        if not chunk:
            raise RedisConnectionError("the server closed the connection")
        if self.pos:
            del self.buf[:self.pos]
            self.pos = 0
        self.buf += chunk

    def _line(self) -> bytes:
        while (end := self.buf.find(b"\r\n", self.pos)) < 0:
            self._fill()
        line = bytes(self.buf[self.pos:end])
        self.pos = end + 2
        return line

    def _exact(self, n: int, dest: memoryview | None = None) -> bytearray | memoryview:
        out: bytearray | memoryview = dest if dest is not None else bytearray(n)
        view = memoryview(out)
        have = min(n, len(self.buf) - self.pos)
        view[:have] = self.buf[self.pos:self.pos + have]
        self.pos += have
        view = view[have:]
        while view.nbytes:
            got = self.sock.recv_into(view)
            if not got:
                raise RedisConnectionError("the server closed the connection")
            view = view[got:]
        while len(self.buf) - self.pos < 2:
            self._fill()
        self.pos += 2  # the CRLF after the data
        return out

    def reply(self, dest: memoryview | None = None) -> Any:
        """One reply: bytes, bytearray (bulk), int, None, or a ResponseError (not raised).

        A bulk reply of exactly ``dest.nbytes`` bytes is received into ``dest``, which is returned.
        """
        line = self._line()
        kind, body = line[:1], line[1:]
        if kind == b"$":
            size = int(body)
            if size < 0:
                return None
            return self._exact(size, dest if dest is not None and dest.nbytes == size else None)
        if kind == b"+":
            return body
        if kind == b"-":
            return ResponseError(body.decode(errors="replace"))
        if kind == b":":
            return int(body)
        if kind == b"_":
            return None
        raise RedisConnectionError(f"unexpected reply {line[:32]!r}")


def run_pipeline(
    client: Any, commands: list[list[Buffer]], dests: Sequence[memoryview | None] | None = None
) -> list[Any]:
    """Send packed commands on one pooled connection of a redis-py ``Redis``; read every reply.

    ``dests[i]``, when given, receives the bulk reply of command ``i`` if its size matches.

    Error replies come back as ResponseError objects. A broken connection (a server restarted
    since the connection was pooled) is retried once on a fresh connection, as redis-py's own
    pipelines do (the commands here are idempotent); a timeout is not retried.
    """
    pool = client.connection_pool
    for attempt in (0, 1):
        conn = pool.get_connection()
        try:
            conn.send_packed_command(coalesce([b for c in commands for b in c]), check_health=False)
            reader = RespReader(conn._sock)
            return [reader.reply(dests[i] if dests else None) for i in range(len(commands))]
        except (TimeoutError, RedisTimeoutError) as exc:
            conn.disconnect()  # a slow server: no second wait
            raise RedisTimeoutError(f"no reply within the socket timeout ({exc})") from None
        except (RedisConnectionError, OSError):
            conn.disconnect()
            if attempt:
                raise
        except BaseException:
            conn.disconnect()  # the stream is out of step: never reuse it
            raise
        finally:
            pool.release(conn)
    raise AssertionError("unreachable")
