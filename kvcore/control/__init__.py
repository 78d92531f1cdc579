"""Control plane: a controller (``kvcore controller``) that sees and steers every instance.

- :func:`attach` hooks a :class:`~kvcore.engine.CacheEngine` to the controller named by
  ``KVCORE_CONTROLLER_URL`` (a no-op when it is unset). Engine connectors call it.
- :class:`~kvcore.control.client.ControllerClient` is the API from Python.
- :mod:`kvcore.control.server` is the FastAPI app (needs ``kvcore[controller]``); nothing else
  here imports FastAPI, so engine processes need no extra dependency.
"""

from __future__ import annotations

import atexit
import threading
from typing import TYPE_CHECKING, Any

from kvcore.config import load_settings
from kvcore.control.settings import ControllerSettings

if TYPE_CHECKING:
    from kvcore.control.reporter import Reporter
    from kvcore.engine import CacheEngine

__all__ = ["ControllerSettings", "attach"]
_lock = threading.Lock()


def attach(engine: CacheEngine, settings: ControllerSettings | None = None,
           **overrides: Any) -> Reporter | None:
    """Report ``engine`` to the controller and run its commands, in background threads.

    Returns the running :class:`~kvcore.control.reporter.Reporter` (close it before the engine),
    or ``None`` when no controller URL is configured. Never blocks on the network and never
    raises because the controller is away. Calling it again for the same engine (for example
    from both the scheduler-side and the worker-side connector) returns the same reporter.
    """
    from kvcore.control.reporter import Reporter

    with _lock:
        existing = getattr(engine, "control_reporter", None)
        if existing is not None:
            return existing
        settings = settings or load_settings(ControllerSettings, **overrides)
        if not settings.url:
            return None
        reporter = Reporter(engine, settings).start()
        engine.control_reporter = reporter  # type: ignore[attr-defined]
    atexit.register(reporter.close)
    return reporter


def __getattr__(name: str) -> Any:
    if name == "ControllerClient":
        from kvcore.control.client import ControllerClient

        return ControllerClient
    raise AttributeError(name)
