"""The ``kvcore`` command's own sub-commands, registered through the same hook as plugins'."""

from __future__ import annotations

from collections.abc import Callable

from kvcore.cli import (
    bench_cmd,
    config_cmd,
    controller_cmd,
    doctor_cmd,
    plugins_cmd,
    trace_cmd,
)
from kvcore.hookspecs import hookimpl


@hookimpl
def kvcore_register_commands(register: Callable[..., None]) -> None:
    register("plugins", plugins_cmd.add_parser)
    register("config", config_cmd.add_parser)
    register("bench", bench_cmd.add_parser)
    register("trace", trace_cmd.add_parser)
    register("controller", controller_cmd.add_parser)
    register("doctor", doctor_cmd.add_parser)
