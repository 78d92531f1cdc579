"""A real ``kvcore controller`` process for tests (kvcore's own and plugins')."""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def start_controller(token: str, port: int = 0, **settings: str) -> tuple[subprocess.Popen, str]:
    """``kvcore controller`` with ``token`` (and ``KVCORE_CONTROLLER_<NAME>`` for each of
    ``settings``), once it listens: the process and its URL."""
    env = {**os.environ, "KVCORE_CONTROLLER_TOKEN": token,
           **{f"KVCORE_CONTROLLER_{name.upper()}": value for name, value in settings.items()}}
    proc = subprocess.Popen([sys.executable, "-m", "kvcore.cli.main", "controller",
                             "--port", str(port)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"kvcore controller did not start: {line!r}")
    return proc, line.split()[-1]


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 5 seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
