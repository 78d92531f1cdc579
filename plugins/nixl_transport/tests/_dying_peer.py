"""A peer that kills itself (SIGKILL) right after it answers a lease: its memory disappears
while the reader's NIXL READ is in flight."""

import os
import signal
import sys
from typing import Any

from kvcore_nixl import server, wire
from kvcore_nixl.peer import main

_send = wire.send


def send_then_die(sock: Any, header: dict, body: bytes = b"") -> None:
    _send(sock, header, body)
    if header.get("lease"):
        os.kill(os.getpid(), signal.SIGKILL)


server.wire.send = send_then_die  # type: ignore[attr-defined]
sys.exit(main())
