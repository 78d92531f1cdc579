"""Entry point of the ``kvcore`` console script.

Every sub-command comes from the ``kvcore_register_commands`` hook: the built-in ones from
:mod:`kvcore.cli.subcommands`, plugins' the same way. Each ``add_parser(subparsers)`` adds its
sub-command and sets ``func(args) -> int`` on it.
A :class:`~kvcore.config.ConfigError` anywhere prints one line and exits with status 2, without
a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from kvcore.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcore", description="KV-cache layer for LLM engines")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from kvcore.plugins import get_registry

    for name, add_parser in get_registry().commands.items():  # built-ins first
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
