"""Connection health: after a failure, calls are misses until a retry time; one log per outage."""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("kvcore.redis")


class Health:
    """Tracks whether the server answers, so a dead server costs one timeout, not one per call."""

    def __init__(self, shown_url: str, retry_interval_s: float) -> None:
        self.shown_url = shown_url
        self.retry_interval_s = retry_interval_s
        self.failures = 0
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._notes: set[str] = set()

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def usable(self) -> bool:
        """False while the server is known down and its retry time has not come."""
        return self._down_since is None or time.monotonic() >= self._retry_at

    def failed(self, what: str, reason: str) -> None:
        """A call could not reach the server: log once per outage, then wait before retrying."""
        with self._lock:
            self.failures += 1
            now = time.monotonic()
            self._retry_at = now + self.retry_interval_s
            if self._down_since is None:
                self._down_since = now
                log.warning(
                    "kvcore redis tier: %s at %s failed (%s); chunks are misses until it answers "
                    "again (retry every %.1fs)", what, self.shown_url, reason,
                    self.retry_interval_s,
                )

    def ok(self) -> None:
        """A call succeeded: the server is back if it was down."""
        if self._down_since is None:
            return
        with self._lock:
            if self._down_since is not None:
                log.warning("kvcore redis tier: %s answers again after %.1fs", self.shown_url,
                            time.monotonic() - self._down_since)
                self._down_since = None
                self._notes.clear()

    def note(self, kind: str, message: str) -> None:
        """Log a condition (for example 'server full') once until :meth:`clear` is called."""
        with self._lock:
            if kind in self._notes:
                return
            self._notes.add(kind)
        log.warning("kvcore redis tier: %s: %s", self.shown_url, message)

    def clear(self, kind: str) -> None:
        if kind in self._notes:
            with self._lock:
                self._notes.discard(kind)
