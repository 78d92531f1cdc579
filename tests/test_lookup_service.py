"""Cross-process lookups: a scheduler process asks a worker process's CPU tier."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest

from kvcore.keys import Namespace, chunk_keys
from kvcore.lookup_service import LookupClient, LookupServer

WORKER = """
import sys, time
from kvcore import CacheEngine, Namespace, load_settings
from kvcore.lookup_service import LookupServer
engine = CacheEngine(load_settings(chunk_size=4))
keys = engine.keys_for(Namespace("m"), range(40))
engine.store_buffers(keys[:6], [b"x" * 64] * 6).wait(10)
server = LookupServer(engine, sys.argv[1])
print("ready", flush=True)
time.sleep(120)
"""


@pytest.fixture
def worker() -> tuple[str, subprocess.Popen]:
    service = uuid.uuid4().hex
    proc = subprocess.Popen([sys.executable, "-c", WORKER, service], stdout=subprocess.PIPE,
                            text=True, env={**os.environ})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    yield service, proc
    proc.kill()
    proc.wait()


def test_client_sees_the_other_process_engine(worker: tuple[str, subprocess.Popen]) -> None:
    service, _ = worker
    client = LookupClient(service, timeout_s=5)
    keys = chunk_keys(Namespace("m"), range(40), 4)
    assert client.lookup(keys) == 6
    assert client.lookup(keys[:3]) == 3
    assert client.lookup(chunk_keys(Namespace("other"), range(40), 4)) == 0
    assert client.lookup([]) == 0
    client.close()


def test_dead_worker_means_misses_not_hangs(worker: tuple[str, subprocess.Popen]) -> None:
    service, proc = worker
    client = LookupClient(service, timeout_s=0.5)
    keys = chunk_keys(Namespace("m"), range(40), 4)
    assert client.lookup(keys) == 6
    proc.kill()
    proc.wait()
    started = time.monotonic()
    assert client.lookup(keys) == 0
    assert time.monotonic() - started < 3


def test_server_rejects_malformed_requests_and_keeps_serving() -> None:
    import socket

    from kvcore.config import load_settings
    from kvcore.engine import CacheEngine
    from kvcore.lookup_service import socket_name

    engine = CacheEngine(load_settings(chunk_size=4))
    service = uuid.uuid4().hex
    server = LookupServer(engine, service)
    try:
        bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bad.settimeout(2)
        bad.connect(socket_name(service))
        bad.sendall(b"EVIL" + b"\0" * 5)
        assert bad.recv(4) == b""  # closed by the server
        keys = engine.keys_for(Namespace("m"), range(8))
        engine.store_buffers(keys, [b"y"] * 2).wait(5)
        assert LookupClient(service, timeout_s=2).lookup(keys) == 2
    finally:
        server.close()
        engine.close()
