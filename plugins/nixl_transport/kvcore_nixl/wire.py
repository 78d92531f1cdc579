"""The metadata side channel's framing: a JSON header and a binary body over TCP.

A frame is ``<II`` (header length, body length), the UTF-8 JSON header, then the body (chunk
keys, NIXL metadata). No pickle: a peer can only send data, never code.

A receiver bounds what it buffers before reading it (``max_header``, ``max_body``), and how long
one frame may take once its first byte arrived (``frame_s``): a frame over either, or one that
is not a JSON object, is a :class:`WireError` and the receiver closes that connection.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from typing import Any

_PREFIX = struct.Struct("<II")
MAX_HEADER = 1 << 20
MAX_BODY = 64 << 20


class WireError(ConnectionError):
    """The peer closed the connection or sent a malformed frame."""


class Closed(WireError):
    """The peer closed the connection (between frames or inside one)."""


def send(sock: socket.socket, header: dict[str, Any], body: bytes = b"") -> None:
    head = json.dumps(header, separators=(",", ":")).encode()
    sock.sendall(_PREFIX.pack(len(head), len(body)) + head + body)


def recv(
    sock: socket.socket, max_header: int = MAX_HEADER, max_body: int = MAX_BODY,
    frame_s: float | None = None,
) -> tuple[dict[str, Any], bytes]:
    """One frame. The wait for its first byte follows the socket's timeout; after that the
    whole frame must arrive within ``frame_s`` (when given)."""
    first = _exact(sock, 1)
    deadline = time.monotonic() + frame_s if frame_s is not None else None
    head_len, body_len = _PREFIX.unpack(first + _exact(sock, _PREFIX.size - 1, deadline))
    if head_len > max_header or body_len > max_body:
        raise WireError(f"frame too large ({head_len} + {body_len} bytes)")
    try:
        header = json.loads(_exact(sock, head_len, deadline))
    except (ValueError, RecursionError) as exc:
        raise WireError(f"bad header: {type(exc).__name__}") from None
    if not isinstance(header, dict):
        raise WireError("header is not an object")
    return header, _exact(sock, body_len, deadline)


def _exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    data = bytearray()
    timeout = sock.gettimeout()
    try:
        while len(data) < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WireError("frame not complete in time")
                sock.settimeout(left if timeout is None else min(left, timeout))
            part = sock.recv(min(n - len(data), 1 << 20))
            if not part:
                raise Closed("connection closed")
            data += part
    except TimeoutError:
        raise WireError("frame not complete in time" if data or deadline else "timed out") \
            from None
    finally:
        if deadline is not None:
            sock.settimeout(timeout)
    return bytes(data)


def split_keys(body: bytes, key_bytes: int = 24) -> list[bytes]:
    if len(body) % key_bytes:
        raise WireError("key list is not a multiple of the key size")
    if not body:
        return []
    return [body[i : i + key_bytes] for i in range(0, len(body), key_bytes)]
