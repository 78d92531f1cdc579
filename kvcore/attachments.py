"""The attachments of one engine: started after its tiers, closed (last first) before them.

An attachment (:class:`~kvcore.interfaces.Attachment`) is whatever runs beside an engine
without being a tier: the controller reporter, kvcore-nixl's peer server. Plugins register
factories through ``kvcore_register_attachments``; each factory decides from its own settings
whether it runs (``None``: off).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from kvcore.config import ConfigError
from kvcore.interfaces import Attachment, AttachmentFactory

if TYPE_CHECKING:
    from kvcore.engine import CacheEngine

log = logging.getLogger("kvcore.attachments")


class Attachments(Mapping[str, Attachment]):
    """The running attachments of one engine, by name (a read-only mapping plus :meth:`add`)."""

    def __init__(self) -> None:
        self._running: dict[str, Attachment] = {}
        self._lock = threading.Lock()
        self._closed = False

    def start(self, engine: CacheEngine, factories: Mapping[str, AttachmentFactory]) -> None:
        """Call every factory in registration order. A :class:`ConfigError` propagates (a bad
        setting fails the engine like any other); any other failure is logged and that
        attachment stays off, so a reporter or server never takes the engine down."""
        for name, factory in factories.items():
            try:
                attachment = factory(engine)
            except ConfigError:
                raise
            except Exception as exc:  # noqa: BLE001 - an attachment never fails the engine
                log.warning("kvcore attachment %s failed to start (%s: %s); the engine runs "
                            "without it", name, type(exc).__name__, exc)
                continue
            if attachment is not None:
                self.add(name, attachment)

    def add(self, name: str, attachment: Attachment) -> Attachment:
        """Run ``attachment`` under ``name`` (closed with the engine). If one already runs under
        that name, ``attachment`` is closed and the running one returned."""
        with self._lock:
            running = self._running.get(name)
            if running is None and not self._closed:
                self._running[name] = attachment
                return attachment
        attachment.close()
        if running is None:
            raise RuntimeError(f"kvcore attachment {name}: the engine is closed")
        return running

    def close(self) -> None:
        """Close every attachment, last started first; a failure is logged, never raised."""
        with self._lock:
            self._closed = True
            running = list(self._running.items())
            self._running.clear()
        for name, attachment in reversed(running):
            try:
                attachment.close()
            except Exception as exc:  # noqa: BLE001 - closing the others matters more
                log.warning("kvcore attachment %s: close failed: %s", name, exc)

    def __getitem__(self, name: str) -> Attachment:
        return self._running[name]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._running))

    def __len__(self) -> int:
        return len(self._running)
