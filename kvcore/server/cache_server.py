"""The built-in plugin of the cache server: its settings, ``kvcore server`` and
``kvcore bench server`` (pyzmq and msgspec are imported only when they run)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from kvcore.hookspecs import hookimpl


@hookimpl
def kvcore_register_settings(register: Callable[..., None]) -> None:
    from kvcore.server.settings import ServerSettings

    register(ServerSettings)


@hookimpl
def kvcore_register_commands(register: Callable[..., None]) -> None:
    from kvcore.cli import server_cmd

    register("server", server_cmd.add_parser)


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    from kvcore.server.bench import add_arguments

    add_arguments(parser)


def _bench_run(args: argparse.Namespace) -> Any:
    from kvcore.server.bench import run

    return run(args)


@hookimpl
def kvcore_register_benchmarks(register: Callable[..., None]) -> None:
    register("server", _bench_arguments, _bench_run)
