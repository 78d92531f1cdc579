"""Loopback ports for tests and benchmarks that start servers."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (the kernel's pick, then released)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def closed_address(host: str = "127.0.0.1") -> str:
    """``host:PORT`` where nothing listens: a peer or server that is down."""
    return f"{host}:{free_port(host)}"
