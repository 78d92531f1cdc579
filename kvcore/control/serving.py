"""How ``kvcore controller`` runs uvicorn: bounded connections, a header deadline, TLS or a
refusal beyond loopback, and an error log that cannot flood the disk.

uvicorn alone has no deadline for a request's headers (its keep-alive timer stops at the first
byte a client sends) and no cap on open connections (``limit_concurrency`` answers 503 only once
a request's headers are complete), so 1,100 connections that never finish their headers made
the controller unreachable. :class:`GuardedH11Protocol` is uvicorn's own h11 protocol with both.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from kvcore.config import ConfigError
from kvcore.control.settings import ControllerSettings

log = logging.getLogger("kvcore.controller")
LOG_BURST = 20
"""Records of one kind a logger passes per LOG_WINDOW_S; the rest are counted, then summed up."""
LOG_WINDOW_S = 60.0


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus: at most ``max_connections`` open connections (beyond,
    a new one is closed at once) and ``header_timeout_s`` to send a request's headers."""

    max_connections = 512
    header_timeout_s = 10.0
    refused = 0
    timed_out = 0

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            type(self).refused += 1
            transport.abort()
            return
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_deadline()

    def _arm_header_deadline(self) -> None:
        cycle = self.cycle
        self.loop.call_later(self.header_timeout_s, self._header_deadline, cycle)

    def _header_deadline(self, cycle: Any) -> None:
        # Still the same cycle (no new request began) and nothing in progress: close.
        if self.transport.is_closing() or self.cycle is not cycle:
            return
        if cycle is None or cycle.response_complete:
            type(self).timed_out += 1
            self.transport.abort()


def protocol_for(settings: ControllerSettings) -> type[GuardedH11Protocol]:
    return type("ControllerH11Protocol", (GuardedH11Protocol,), {
        "max_connections": settings.max_connections,
        "header_timeout_s": settings.header_timeout_s,
    })


class LogBudget(logging.Filter):
    """Pass at most ``burst`` records of one kind (logger, message template) per window; count
    the rest and report the count with the next record of that kind after the window."""

    def __init__(self, burst: int = LOG_BURST, window_s: float = LOG_WINDOW_S) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self._seen: dict[tuple[str, str], list[float]] = {}  # kind -> [window start, n, dropped]
        self._lock = threading.Lock()
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.name, str(record.msg)[:200])
        now = time.monotonic()
        with self._lock:
            state = self._seen.get(kind)
            if state is None:
                if len(self._seen) > 1000:
                    self._seen.clear()
                state = self._seen[kind] = [now, 0, 0]
            if now - state[0] > self.window_s:
                if state[2]:
                    record.msg = f"{record.msg} [{int(state[2])} more like this were not logged]"
                state[:] = [now, 0, 0]
            state[1] += 1
            if state[1] <= self.burst:
                return True
            state[2] += 1
            self.dropped += 1
            if state[1] == self.burst + 1:
                record.msg = f"{record.msg} [more like this in the next {self.window_s:.0f}s " \
                             "are not logged]"
                record.exc_info = None
                record.exc_text = None
                return True
            return False


def install_log_budget() -> LogBudget:
    """One budget on the loggers a flood of bad connections writes to."""
    budget = LogBudget()
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "asyncio", "kvcore.controller"):
        logging.getLogger(name).addFilter(budget)
    return budget


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(settings: ControllerSettings) -> str | None:
    """Refuse plain HTTP beyond loopback unless asked for; the warning to print, if any."""
    tls = bool(settings.ssl_certfile and settings.ssl_keyfile)
    if bool(settings.ssl_certfile) != bool(settings.ssl_keyfile):
        raise ConfigError("KVCORE_CONTROLLER_SSL_CERTFILE and KVCORE_CONTROLLER_SSL_KEYFILE go "
                          "together: set both (or neither)")
    if tls or is_loopback(settings.host):
        return None
    if not settings.allow_plain_http:
        raise ConfigError(
            f"KVCORE_CONTROLLER_HOST={settings.host!r} is reachable beyond this machine, and "
            "plain HTTP would send the bearer token in clear text: set "
            "KVCORE_CONTROLLER_SSL_CERTFILE and KVCORE_CONTROLLER_SSL_KEYFILE (https), bind "
            "127.0.0.1 behind a TLS proxy, or set KVCORE_CONTROLLER_ALLOW_PLAIN_HTTP=1 on a "
            "network you trust")
    return (f"kvcore controller: WARNING: serving plain HTTP on {settings.host} "
            "(KVCORE_CONTROLLER_ALLOW_PLAIN_HTTP=1): the bearer token and every request cross "
            "the network unencrypted")


def uvicorn_options(settings: ControllerSettings) -> dict[str, Any]:
    """Keyword arguments of ``uvicorn.Config`` for the controller."""
    options: dict[str, Any] = dict(
        http=protocol_for(settings),
        access_log=False,
        timeout_graceful_shutdown=1,
        timeout_keep_alive=settings.keep_alive_s,
        limit_concurrency=settings.max_connections,
        h11_max_incomplete_event_size=16 * 1024,
    )
    if settings.ssl_certfile:
        options.update(ssl_certfile=settings.ssl_certfile, ssl_keyfile=settings.ssl_keyfile)
    return options
