"""Built-in plugin: makes the controller's settings visible to ``kvcore config`` and the
reference."""

from __future__ import annotations

from collections.abc import Callable

from kvcore.control.settings import ControllerSettings
from kvcore.hookspecs import hookimpl


@hookimpl
def kvcore_register_settings(register: Callable[..., None]) -> None:
    register(ControllerSettings)
