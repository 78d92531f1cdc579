"""Control plane: a controller (``kvcore controller``) that sees and steers every instance.

- :func:`attach` hooks a :class:`~kvcore.engine.CacheEngine` to the controller named by
  ``KVCORE_CONTROLLER_URL`` (a no-op when it is unset). Every engine calls it as its
  ``controller`` attachment (:mod:`kvcore.control.plugin`).
- :class:`~kvcore.control.client.ControllerClient` is the API from Python.
- :mod:`kvcore.control.server` is the FastAPI app (needs ``kvcore[controller]``); nothing else
  here imports FastAPI, so engine processes need no extra dependency.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvcore.config import load_settings
from kvcore.control.settings import ControllerSettings

if TYPE_CHECKING:
    from kvcore.control.reporter import Reporter
    from kvcore.engine import CacheEngine

__all__ = ["ControllerSettings", "attach"]


def attach(engine: CacheEngine, settings: ControllerSettings | None = None,
           **overrides: Any) -> Reporter | None:
    """Report ``engine`` to the controller and run its commands, in background threads.

    Every engine does this by itself when ``KVCORE_CONTROLLER_URL`` is set (the built-in
    ``controller`` attachment); call it for an engine built with ``attachments=False`` or to
    report with other settings. Returns the running
    :class:`~kvcore.control.reporter.Reporter` (closed with the engine), or ``None`` when no
    controller URL is configured. Never blocks on the network and never raises because the
    controller is away. Calling it again for the same engine returns the same reporter.
    """
    existing = engine.attachments.get("controller")
    if existing is not None:
        return existing  # type: ignore[return-value]
    reporter = new_reporter(engine, settings, **overrides)
    if reporter is None:
        return None
    running = engine.attachments.add("controller", reporter)
    if running is reporter:
        reporter.start()
    return running  # type: ignore[return-value]


def new_reporter(engine: CacheEngine, settings: ControllerSettings | None = None,
                 **overrides: Any) -> Reporter | None:
    """A reporter for ``engine``, not started yet; ``None`` when no controller URL is set."""
    settings = settings or load_settings(ControllerSettings, **overrides)
    if not settings.url:
        return None
    from kvcore.control.reporter import Reporter

    return Reporter(engine, settings)


def __getattr__(name: str) -> Any:
    if name == "ControllerClient":
        from kvcore.control.client import ControllerClient

        return ControllerClient
    raise AttributeError(name)
