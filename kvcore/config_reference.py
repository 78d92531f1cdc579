"""Markdown reference of every ``KVCORE_*`` setting, generated from the settings models.

``docs/configuration.md`` is this output (``make docs`` rewrites it; a test checks it is current),
so the reference cannot drift from the code.
"""

from __future__ import annotations

from pydantic_settings import BaseSettings

from kvcore.config import Settings

EXAMPLES = "kvcore_example_tier"
"""Settings of the documentation's example plugin are not part of the reference."""


def _default_text(cls: type[BaseSettings], name: str) -> str:
    field = cls.model_fields[name]
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    else:
        value = field.default
    if isinstance(value, list):
        return ",".join(value)
    if value is None:
        return "(unset)"
    if hasattr(value, "get_secret_value"):
        return "(unset)" if not value.get_secret_value() else "(secret)"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1024**2 \
            and ("size" in name or name.endswith("_bytes")):
        for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2)):
            if value % scale == 0:
                return f"{value // scale}{unit}"
    return str(value)


def settings_table(cls: type[BaseSettings], title: str) -> list[str]:
    prefix = str(cls.model_config.get("env_prefix", "KVCORE_"))
    summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
    lines = [f"## {title}", "", summary, "", "| variable | default | meaning |",
             "| --- | --- | --- |"]
    for name, field in cls.model_fields.items():
        description = (field.description or "").replace("|", "\\|")
        lines.append(f"| `{prefix}{name.upper()}` | `{_default_text(cls, name)}` | "
                     f"{description} |")
    lines.append("")
    return lines


def reference_markdown(plugin_settings: dict[str, type[BaseSettings]]) -> str:
    """The whole reference: core settings, then each plugin's, sorted by prefix."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from the settings models by `kvcore config --reference`; do not edit by hand.",
        "Every setting is an environment variable. `KVCORE_CONFIG_FILE` may name a YAML or TOML",
        "file with the same settings (core ones at the top level, a plugin's in its own table,",
        "for example `lmdb: {path: /data/kv}`); the environment wins over the file. Sizes accept",
        "units (`512MiB`, `4GB`); lists are comma-separated (`cpu,lmdb`). No float takes `inf`",
        "or `nan`. `kvcore config` and `kvcore doctor` exit 2 on a bad value, an unknown",
        "`KVCORE_*` variable or config-file key (naming the closest known one) and what a",
        "plugin would refuse when it starts (an unusable Redis URL); an engine logs a warning",
        "for an unknown variable or key and ignores it.",
        "",
    ]
    lines += settings_table(Settings, "`KVCORE_*`: core")
    shipped = [c for c in plugin_settings.values() if not c.__module__.startswith(EXAMPLES)]
    ordered = sorted(shipped,
                     key=lambda c: str(c.model_config.get("env_prefix", "")))
    for cls in ordered:
        prefix = str(cls.model_config.get("env_prefix", ""))
        package = cls.__module__.split(".")[0].replace("_", "-")
        owner = "core, control API" if package == "kvcore" else package
        lines += settings_table(cls, f"`{prefix}*`: {owner}")
    return "\n".join(lines)
