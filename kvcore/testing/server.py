"""A real ``kvcore server`` process for tests (kvcore's own and plugins')."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path


class ServerProcess:
    """``kvcore server`` on a socket under ``directory`` (its shared memory there too, unless
    ``shm_dir`` says otherwise)."""

    def __init__(self, directory: Path, budget: int, lease_s: float = 0.6,
                 eviction: str = "lru", shm_dir: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        """``env``: more settings of the server (its lower tiers, a controller)."""
        self.url = f"unix://{directory}/sock/kvcore.sock"
        self.directory = directory
        self.env = {**os.environ, "KVCORE_SERVER_URL": self.url,
                    "KVCORE_SERVER_LEASE_S": str(lease_s),
                    "KVCORE_SERVER_SHM_DIR": str(shm_dir or directory),
                    "KVCORE_CPU_SIZE": str(budget), "KVCORE_EVICTION": eviction,
                    **(env or {})}
        self.proc: subprocess.Popen[str] | None = None

    def client_env(self, **extra: str) -> dict[str, str]:
        """What an engine process needs to attach (short timeouts, for tests)."""
        return {"KVCORE_SERVER_URL": self.url, "KVCORE_SERVER_LEASE_S": self.env[
            "KVCORE_SERVER_LEASE_S"], "KVCORE_SERVER_TIMEOUT_S": "1.0",
            "KVCORE_SERVER_RETRY_S": "0.2", **extra}

    def start(self) -> ServerProcess:
        """Start it and wait until it listens."""
        self.proc = subprocess.Popen([sys.executable, "-m", "kvcore.cli.main", "server"],
                                     env=self.env, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.kill()
            raise RuntimeError(f"kvcore server did not start: {line!r}")
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no clean-up at all."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> int:
        """SIGTERM; the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(10)


def serving(server: ServerProcess, setenv: Callable[[str, str], None]
            ) -> Iterator[ServerProcess]:
    """A pytest fixture's body: start ``server``, point this process's engines at it (through
    ``setenv``, such as ``monkeypatch.setenv``), and kill it at teardown if it still runs."""
    server.start()
    for name, value in server.client_env().items():
        setenv(name, value)
    try:
        yield server
    finally:
        if server.running:
            server.kill()
