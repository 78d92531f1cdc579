"""Test-only: put on PYTHONPATH of a prefill server to make it SIGKILL itself right after it
answers its first NIXL lease, so the decode side's READ is in flight when its peer dies."""

import os
import signal


def _patch() -> None:
    try:
        from kvcore_nixl import server, wire
    except Exception:
        return
    send = wire.send

    def send_then_die(sock, header, body=b""):  # type: ignore[no-untyped-def]
        send(sock, header, body)
        if header.get("lease"):
            os.kill(os.getpid(), signal.SIGKILL)

    server.wire.send = send_then_die  # type: ignore[attr-defined]


_patch()
