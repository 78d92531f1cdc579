"""The ``example_usage_log`` attachment: logs the engine's tier usage every few seconds.

It shows the attachment lifecycle: the factory gets the engine once its tiers exist, starts a
thread (or returns ``None`` when ``KVCORE_EXAMPLE_USAGE_LOG_S`` is 0, the default), and the
engine calls :meth:`UsageLog.close` before it closes its tiers.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from kvcore.config import load_settings
from kvcore.interfaces import Attachment
from kvcore_example_tier.settings import ExampleSettings

if TYPE_CHECKING:
    from kvcore.engine import CacheEngine

log = logging.getLogger("kvcore.example")


class UsageLog(Attachment):
    """A daemon thread that logs ``used/budget`` of each tier every ``interval_s``."""

    def __init__(self, engine: CacheEngine, interval_s: float) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self.lines = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvcore-example-usage",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            tiers = self.engine.stats()["tiers"]
            log.info("kvcore example usage: %s", ", ".join(
                f"{name} {t.get('used_bytes', '?')}/{t.get('budget_bytes', '?')} B"
                for name, t in tiers.items()))
            self.lines += 1

    def close(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)


def start_usage_log(engine: CacheEngine) -> UsageLog | None:
    """The attachment factory: ``None`` (off) unless ``KVCORE_EXAMPLE_USAGE_LOG_S`` > 0."""
    settings = load_settings(ExampleSettings)
    if settings.usage_log_s <= 0:
        return None
    return UsageLog(engine, settings.usage_log_s)
