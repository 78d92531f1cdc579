"""Built-in plugin: the ``controller`` attachment (every engine reports to
``KVCORE_CONTROLLER_URL`` when it is set) and the controller's settings."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from kvcore.control.settings import ControllerSettings
from kvcore.hookspecs import hookimpl

if TYPE_CHECKING:
    from kvcore.control.reporter import Reporter
    from kvcore.engine import CacheEngine


@hookimpl
def kvcore_register_settings(register: Callable[..., None]) -> None:
    register(ControllerSettings)


def start_reporter(engine: CacheEngine) -> Reporter | None:
    """The ``controller`` attachment: a reporter when ``KVCORE_CONTROLLER_URL`` is set."""
    from kvcore.control import new_reporter

    reporter = new_reporter(engine)
    return reporter.start() if reporter is not None else None


@hookimpl
def kvcore_register_attachments(register: Callable[..., None]) -> None:
    register("controller", start_reporter)
