"""Start throw-away ``redis-server`` processes on loopback (tests and ``kvcore bench redis``).

Each server gets a free port, its own temporary directory, no persistence, and is killed by
:meth:`RedisServer.stop`. :func:`start_cluster` starts several with ``cluster-enabled yes`` and
joins them with CLUSTER ADDSLOTSRANGE / CLUSTER MEET through redis-py.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from kvcore.testing.ports import free_port

SLOTS = 16384


class RedisMissing(RuntimeError):
    """No ``redis-server`` on PATH."""


def find_redis_server() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise RedisMissing(
            "redis-server is not on PATH: install it (Debian/Ubuntu: apt-get install "
            "redis-server; it is not needed as a system service)"
        )
    return path


class RedisServer:
    """One ``redis-server`` on 127.0.0.1 and a unix socket, in a temporary directory."""

    def __init__(self, *, password: str | None = None, maxmemory: str = "256mb",
                 policy: str = "allkeys-lru", cluster: bool = False,
                 extra: list[str] | None = None) -> None:
        self.binary = find_redis_server()
        self.dir = Path(tempfile.mkdtemp(prefix="kvredis-"))
        self.port = free_port()
        self.cluster_port = free_port() if cluster else 0
        self.socket = str(self.dir / "redis.sock")
        self.password = password
        args = [
            "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--unixsocket", self.socket, "--unixsocketperm", "700",
            "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--logfile", str(self.dir / "redis.log"),
            "--maxmemory", maxmemory, "--maxmemory-policy", policy,
        ]
        if password:
            args += ["--requirepass", password]
        if cluster:
            args += ["--cluster-enabled", "yes", "--cluster-port", str(self.cluster_port),
                     "--cluster-config-file", str(self.dir / "nodes.conf")]
        self.args = [self.binary, *args, *(extra or [])]
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                           socket_timeout=5)

    def start(self, timeout_s: float = 10.0) -> None:
        """Start (or restart, on the same port) and wait until it answers PING."""
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        client = self.client()
        while True:
            try:
                if client.ping():
                    break
            except redis.RedisError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.dir / "redis.log")
                tail = log.read_text()[-2000:] if log.exists() else ""
                self.stop()
                raise RuntimeError(f"redis-server did not start: {' '.join(self.args)}\n{tail}")
            time.sleep(0.02)
        client.close()

    def kill(self) -> None:
        """SIGKILL the server (keeps the directory, so :meth:`start` can bring it back)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Kill the server and remove its directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisClusterServers:
    """``count`` cluster-enabled servers sharing the 16384 slots, no replicas."""

    def __init__(self, count: int = 3, maxmemory: str = "128mb", timeout_s: float = 20.0) -> None:
        self.nodes: list[RedisServer] = []
        try:
            for _ in range(count):
                self.nodes.append(RedisServer(cluster=True, maxmemory=maxmemory))
            self._join(timeout_s)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def _join(self, timeout_s: float) -> None:
        clients = [n.client() for n in self.nodes]
        share = SLOTS // len(clients)
        for i, client in enumerate(clients):
            last = SLOTS - 1 if i == len(clients) - 1 else (i + 1) * share - 1
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * share, last)
        for node in self.nodes[1:]:
            clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", node.port,
                                       node.cluster_port)
        deadline = time.monotonic() + timeout_s
        while True:
            states = [c.execute_command("CLUSTER", "INFO") for c in clients]
            if all(b"cluster_state:ok" in s and b"cluster_known_nodes:%d" % len(clients) in s
                   for s in states):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster did not form: {states}")
            time.sleep(0.05)
        for client in clients:
            client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
