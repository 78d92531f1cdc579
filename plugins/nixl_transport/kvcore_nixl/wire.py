"""The metadata side channel's framing: a JSON header and a binary body over TCP.

A frame is ``<II`` (header length, body length), the UTF-8 JSON header, then the body (chunk
keys, NIXL metadata). No pickle: a peer can only send data, never code.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

_PREFIX = struct.Struct("<II")
MAX_HEADER = 1 << 20
MAX_BODY = 64 << 20


class WireError(ConnectionError):
    """The peer closed the connection or sent a malformed frame."""


def send(sock: socket.socket, header: dict[str, Any], body: bytes = b"") -> None:
    head = json.dumps(header, separators=(",", ":")).encode()
    sock.sendall(_PREFIX.pack(len(head), len(body)) + head + body)


def recv(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    head_len, body_len = _PREFIX.unpack(_exact(sock, _PREFIX.size))
    if head_len > MAX_HEADER or body_len > MAX_BODY:
        raise WireError(f"frame too large ({head_len} + {body_len} bytes)")
    try:
        header = json.loads(_exact(sock, head_len))
    except ValueError as exc:
        raise WireError(f"bad header: {exc}") from None
    if not isinstance(header, dict):
        raise WireError("header is not an object")
    return header, _exact(sock, body_len)


def _exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        part = sock.recv(min(n - len(data), 1 << 20))
        if not part:
            raise WireError("connection closed")
        data += part
    return bytes(data)


def split_keys(body: bytes, key_bytes: int = 24) -> list[bytes]:
    if len(body) % key_bytes:
        raise WireError("key list is not a multiple of the key size")
    return [body[i : i + key_bytes] for i in range(0, len(body), key_bytes)]
