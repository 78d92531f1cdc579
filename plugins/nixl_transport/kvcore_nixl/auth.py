"""Mutual HMAC challenge-response on the side channel (``KVCORE_NIXL_SECRET``).

The secret never crosses the wire. On each new connection:

1. client -> ``{"op": "hello", "nonce": Nc, "agent": <its NIXL agent name>}``
2. server -> ``{"challenge": Ns, "proof": HMAC(K, "server" | Nc | Ns)}`` (no metadata yet)
3. client checks the server's proof (a server without the secret cannot serve it forged
   chunks), then -> ``{"op": "auth", "proof": HMAC(K, "client" | Ns | Nc)}``
4. server checks it -> ``{"agent": ...}`` plus its NIXL metadata; from here on the connection
   may lease and read. A wrong or missing proof closes the connection.

Nonces are 32 random bytes from each side, so a recorded exchange cannot be replayed, and
neither side can be used as an oracle for the other's proof (the labels differ). HMAC-SHA256
from the standard library; comparisons are constant-time. What this does not do: encrypt or
sign later frames (an attacker on the path could still read or inject them; the NIXL transfer
itself is not encrypted either). Deploy peers on a private network.
"""

from __future__ import annotations

import hashlib
import hmac
import os

NONCE_BYTES = 32
_SERVER = b"kvcore-nixl-v1/server\0"
_CLIENT = b"kvcore-nixl-v1/client\0"


def nonce() -> str:
    return os.urandom(NONCE_BYTES).hex()


def _nonce_bytes(value: object) -> bytes | None:
    if not isinstance(value, str) or len(value) != 2 * NONCE_BYTES:
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        return None


def server_proof(secret: bytes, client_nonce: str, server_nonce: str) -> str:
    return hmac.new(secret, _SERVER + client_nonce.encode() + b"\0" + server_nonce.encode(),
                    hashlib.sha256).hexdigest()


def client_proof(secret: bytes, client_nonce: str, server_nonce: str) -> str:
    return hmac.new(secret, _CLIENT + server_nonce.encode() + b"\0" + client_nonce.encode(),
                    hashlib.sha256).hexdigest()


def valid_nonce(value: object) -> bool:
    return _nonce_bytes(value) is not None


def check(expected: str, given: object) -> bool:
    return isinstance(given, str) and hmac.compare_digest(expected.encode(), given.encode())
