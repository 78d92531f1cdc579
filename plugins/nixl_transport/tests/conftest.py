"""Fixtures: peer processes over UCX loopback, killed at teardown."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvcore.testing.ports import closed_address  # noqa: F401  (tests import it from here)

os.environ["UCX_TLS"] = os.environ.get("KVCORE_TEST_UCX_TLS", "tcp")  # before any agent exists
HERE = Path(__file__).parent


class Peer:
    def __init__(self, proc: subprocess.Popen, info: dict) -> None:
        self.proc = proc
        self.info = info
        self.address: str = info["address"]


def start_peer(args: list[str], env: dict[str, str] | None = None) -> Peer:
    from kvcore_nixl.peer import read_ready

    proc = subprocess.Popen(
        [sys.executable, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        return Peer(proc, read_ready(proc.stdout))
    except Exception:
        proc.kill()
        proc.wait()
        raise


def stop(peer: Peer) -> None:
    if peer.proc.poll() is None:
        peer.proc.kill()
    peer.proc.wait()
    for stream in (peer.proc.stdin, peer.proc.stdout):
        if stream is not None:
            stream.close()


@pytest.fixture
def peer_factory() -> Iterator:
    started: list[Peer] = []

    def factory(*args: str, env: dict[str, str] | None = None) -> Peer:
        peer = start_peer(list(args), env)
        started.append(peer)
        return peer

    yield factory
    for peer in started:
        stop(peer)


@pytest.fixture
def peer(peer_factory: Any) -> Peer:
    """A peer process holding 8 chunks of 256 KiB (tenant ``peer``)."""
    return peer_factory("-m", "kvcore_nixl.peer", "--chunks", "8", "--chunk-bytes", "262144")
