"""Docs that are generated from code stay in step with it."""

from __future__ import annotations

from pathlib import Path

from kvcore.config_reference import reference_markdown
from kvcore.plugins import PluginRegistry

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_reference_is_current() -> None:
    registry = PluginRegistry().load(allow=None)
    expected = reference_markdown(registry.settings) + "\n"
    actual = (ROOT / "docs" / "configuration.md").read_text()
    assert actual == expected, "docs/configuration.md is stale: run `make docs`"


def test_every_setting_has_a_description() -> None:
    registry = PluginRegistry().load(allow=None)
    for cls in registry.settings.values():
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no description"


def test_docs_link_to_existing_files() -> None:
    import re

    for page in (ROOT / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+)\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
