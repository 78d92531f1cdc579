"""Entry point of the ``kvcore`` console script.

Each module in :data:`COMMANDS` defines ``add_parser(subparsers)``, which adds its sub-command
and sets ``func(args) -> int`` on it; plugins add theirs through ``kvcore_register_commands``.
A :class:`~kvcore.config.ConfigError` anywhere prints one line and exits with status 2, without
a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Any

from kvcore.config import ConfigError

COMMANDS = (
    "kvcore.cli.plugins_cmd",
    "kvcore.cli.config_cmd",
    "kvcore.cli.bench_cmd",
    "kvcore.cli.trace_cmd",
    "kvcore.cli.controller_cmd",
    "kvcore.cli.doctor_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcore", description="KV-cache layer for LLM engines")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMANDS:
        importlib.import_module(module_name).add_parser(sub)
    from kvcore.plugins import get_registry

    for name, add_parser in sorted(get_registry().commands.items()):
        try:
            add_parser(sub)
        except Exception as exc:  # noqa: BLE001 - a plugin's broken command must not break the CLI
            logging.getLogger("kvcore.cli").warning("command %s from a plugin failed: %s",
                                                    name, exc)
    return parser


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"kvcore: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
