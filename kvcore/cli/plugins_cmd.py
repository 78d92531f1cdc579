"""``kvcore plugins [--json]``: every discovered plugin, what it registers, and its load error."""

from __future__ import annotations

import argparse

from kvcore.cli.main import print_json
from kvcore.config import load_settings
from kvcore.plugins import get_registry


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("plugins", help="list plugins and what they register")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)


def copy_path_info() -> dict:
    """Which batched-copy implementation is active (native C++/CUDA or the torch fallback)."""
    try:
        from kvcore.copy import backend_info
    except ImportError:
        return {"active": "numpy", "note": "kvcore.copy not available"}
    return backend_info()


def run(args: argparse.Namespace) -> int:
    settings = load_settings()
    registry = get_registry(settings.plugins)
    plugins = [p.as_dict() for p in registry.plugins]
    copy = copy_path_info()
    if args.json:
        print_json({"plugins": plugins, "copy_backend": copy})
        return 0
    for p in plugins:
        origin = "built-in" if p["builtin"] else f"{p['distribution']} {p['version']}"
        print(f"{p['name']:<16} {origin:<24} {p['module']}")
        for kind, names in sorted(p["registers"].items()):
            print(f"    {kind}: {', '.join(names)}")
        if p["error"]:
            print(f"    ERROR: {p['error']}")
    print(f"copy backend: {copy.get('active')}")
    return 0
