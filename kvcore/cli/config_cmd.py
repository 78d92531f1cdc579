"""``kvcore config [--json]``: the effective settings, core and plugins."""

from __future__ import annotations

import argparse

from kvcore.cli.main import print_json
from kvcore.config import PluginSettings, Settings, check_environment, load_settings
from kvcore.plugins import get_registry


def effective_settings() -> dict[str, dict]:
    """Settings by section (``core`` and each plugin's settings class), validated and checked
    (:meth:`PluginSettings.check`); an unknown ``KVCORE_*`` variable or config-file key is an
    error (naming the closest known one)."""
    settings = load_settings()
    sections: dict[str, dict] = {"core": settings.model_dump()}
    registry = get_registry(settings.plugins)
    check_environment([Settings, *get_registry(allow=None).settings.values()])
    for name, cls in sorted(registry.settings.items()):
        plugin_settings: PluginSettings = load_settings(cls)
        plugin_settings.check()
        sections[name] = plugin_settings.model_dump()
    return sections


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("config", help="print the effective settings")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--reference", action="store_true",
                        help="print the Markdown reference of every setting "
                             "(docs/configuration.md)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.reference:
        from kvcore.config_reference import reference_markdown

        print(reference_markdown(get_registry(allow=None).settings))
        return 0
    sections = effective_settings()
    if args.json:
        print_json(sections)
        return 0
    for section, values in sections.items():
        print(f"[{section}]")
        for key, value in values.items():
            print(f"  {key} = {value!r}")
    return 0
