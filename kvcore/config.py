"""Settings: every option is a ``KVCORE_*`` environment variable.

Values may also come from a YAML or TOML file named by ``KVCORE_CONFIG_FILE``; the environment
wins over the file. Plugins declare their own settings as subclasses of :class:`PluginSettings`
with ``env_prefix = "KVCORE_<PLUGIN>_"`` and read them with :func:`load_settings`, so they get
the same file support and the same error messages.

A bad value raises :class:`ConfigError` whose message names the variable, the value and the
accepted form; the CLI prints it without a traceback.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, overload

import yaml
from pydantic import BeforeValidator, Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

__all__ = [
    "ByteSize",
    "ConfigError",
    "NameList",
    "PluginSettings",
    "Settings",
    "load_settings",
    "parse_byte_size",
]


class ConfigError(ValueError):
    """A setting has a bad value. The message is meant for the user as it is."""


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
BYTE_SIZE_FORM = "a byte size such as 512MiB, 4GB, 1.5GiB or 1073741824"


def parse_byte_size(value: Any) -> int:
    """Parse ``512MiB``, ``4GB``, ``1.5 GiB`` or a plain integer into bytes."""
    if isinstance(value, bool):
        raise ValueError(f"expected {BYTE_SIZE_FORM}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"expected {BYTE_SIZE_FORM}, not a negative number")
        return value
    match = _SIZE_RE.match(str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"expected {BYTE_SIZE_FORM}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _split_names(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


ByteSize = Annotated[int, BeforeValidator(parse_byte_size)]
"""An integer number of bytes, given with or without a unit."""

NameList = Annotated[list[str], NoDecode, BeforeValidator(_split_names)]
"""A comma-separated list of names (``cpu,lmdb``), or a list in a config file."""


class _ConfigFileSource(PydanticBaseSettingsSource):
    """Reads the file named by ``KVCORE_CONFIG_FILE`` (YAML or TOML).

    Core settings sit at the top level; a plugin's settings sit in a table named by its
    ``file_section`` (``lmdb:`` holding ``path:``), or at the top level with the prefix
    (``lmdb_path:``).
    """

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        self._data = _read_config_file()
        section = getattr(settings_cls, "file_section", "")
        prefix = f"{section}_" if section else ""
        flat: dict[str, Any] = {}
        for key, value in self._data.items():
            if prefix and key.startswith(prefix):
                flat[key[len(prefix) :]] = value
            elif not prefix and not isinstance(value, dict):
                flat[key] = value
        if section and isinstance(self._data.get(section), dict):
            flat.update(self._data[section])
        self._flat = flat

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._flat.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._flat.items() if k in self.settings_cls.model_fields}


def _read_config_file() -> dict[str, Any]:
    path_text = os.environ.get("KVCORE_CONFIG_FILE", "").strip()
    if not path_text:
        return {}
    path = Path(path_text)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(
            f"KVCORE_CONFIG_FILE={path_text!r}: cannot read the file ({exc.strerror})"
        ) from None
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(
                f"KVCORE_CONFIG_FILE={path_text!r}: expected a .yaml, .yml or .toml file"
            )
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"KVCORE_CONFIG_FILE={path_text!r}: not valid: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"KVCORE_CONFIG_FILE={path_text!r}: expected a mapping at the top level")
    return {str(k).lower().replace("-", "_"): v for k, v in data.items()}


class _KVCoreSettingsBase(BaseSettings):
    """Shared source order: constructor arguments, then environment, then the config file."""

    model_config = SettingsConfigDict(env_prefix="KVCORE_", extra="ignore", frozen=True,
                                      allow_inf_nan=False)
    """``allow_inf_nan=False``: ``inf`` or ``nan`` for any float (a timeout of ``inf`` would wait
    for ever) is refused naming the variable; subclasses inherit it."""
    file_section: ClassVar[str] = ""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _ConfigFileSource(settings_cls))


class Settings(_KVCoreSettingsBase):
    """Core settings of kvcore."""

    chunk_size: int = Field(
        256, gt=0, description="Tokens per chunk: the unit of lookup, storage and eviction."
    )
    tiers: NameList = Field(
        default_factory=lambda: ["cpu"],
        description="Storage tiers, fastest first, comma-separated (for example cpu,lmdb).",
    )
    cpu_size: ByteSize = Field(
        4 * 1024**3, description="Byte budget of the CPU tier (units: 512MiB, 4GB, ...)."
    )
    eviction: str = Field(
        "prefix_value",
        description="Eviction policy name used by every tier (see `kvcore plugins`).",
    )
    plugins: NameList | None = Field(
        None,
        description=(
            "Allow-list of third-party plugins (entry-point or distribution names); "
            "unset loads every installed plugin."
        ),
    )
    store_queue_size: int = Field(
        64, gt=0, description="Pending asynchronous stores before new ones are dropped."
    )
    write_behind: bool = Field(
        True, description="Copy stored chunks into the lower tiers in the background."
    )
    lower_admission: Literal["all", "reused"] = Field(
        "all",
        description=(
            "Which stored chunks write-behind copies below memory: `all`, or `reused` (only "
            "once a chunk is asked for a second time: fewer bytes written, see "
            "docs/eviction.md)."
        ),
    )
    planner: Literal["auto", "load"] = Field(
        "auto",
        description=(
            "Load or recompute: `auto` claims a chunk found below memory only when its measured "
            "load is expected to finish before the engine would recompute it (docs/planner.md); "
            "`load` claims every chunk found."
        ),
    )
    request_log_size: int = Field(
        1000, ge=0, le=1_000_000,
        description=(
            "Requests whose record (tokens asked, hit by tier, why the rest missed) is kept for "
            "`/v1/requests`; 0 keeps none (see docs/misses.md)."
        ),
    )
    chunk_history_size: int = Field(
        50_000, ge=0, le=10_000_000,
        description=(
            "Chunks whose latest fate per tier (stored, evicted, deleted, corrupt) is "
            "remembered to explain misses; about 300 bytes each."
        ),
    )
    tier_timeout_s: float = Field(
        5.0, gt=0, allow_inf_nan=False,
        description="Longest wait for one tier operation before it counts as a miss.",
    )
    log_level: str = Field("WARNING", description="Log level of the kvcore logger.")
    background_nice: int = Field(
        10, ge=0, le=19,
        description=(
            "Nice value added to kvcore's background threads (stores, write-behind, prefetch, "
            "lower-tier reads, asynchronous loads), so they yield the CPU to the engine; 0 "
            "keeps the engine's priority."
        ),
    )
    verify_sample: float = Field(
        0.01, ge=0.0, le=1.0, allow_inf_nan=False,
        description=(
            "Fraction of requests that would hit which an engine connector recomputes instead, "
            "comparing the fresh KV with the stored chunks (a mismatch deletes the chunk); "
            "0 turns verification off."
        ),
    )
    verify_tolerance: float = Field(
        0.0625, ge=0.0, allow_inf_nan=False,
        description=(
            "Verification: largest difference between a stored and a recomputed KV element, "
            "relative to the element's magnitude (at least 1), that still counts as equal; "
            "0 demands identical bytes."
        ),
    )

    @field_validator("tiers")
    @classmethod
    def _tiers_not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("expected at least one tier name, for example cpu")
        if len(set(value)) != len(value):
            raise ValueError("a tier is named twice")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level


class PluginSettings(_KVCoreSettingsBase):
    """Base of a plugin's settings: set ``env_prefix`` to ``KVCORE_<PLUGIN>_`` and
    ``file_section`` to the plugin's table name in the config file."""

    def check(self) -> None:
        """Raise :class:`ConfigError` for what the plugin would refuse when it builds its parts
        (an unusable URL, say), without connecting anywhere; ``kvcore config`` and
        ``kvcore doctor`` call it, so they reject what the engine would. Default: nothing."""


S = TypeVar("S", bound=BaseSettings)


def _accepted_form(cls: type[BaseSettings], field_name: str) -> str:
    field = cls.model_fields.get(field_name)
    if field is None:
        return ""
    meta = " ".join(str(m) for m in field.metadata)
    if "parse_byte_size" in meta:
        return BYTE_SIZE_FORM
    return field.description or ""


ALWAYS_KNOWN = frozenset({
    "KVCORE_CONFIG_FILE",  # where the settings come from
    "KVCORE_NO_NATIVE", "KVCORE_CUDA_ARCHS",  # build time (setup.py)
    "KVCORE_SMOLLM_DIR",  # the demo model's directory (kvcore_vllm.smollm)
    "KVCORE_ASSERT_TIMING", "KVCORE_REQUIRE_NATIVE_CUDA", "KVCORE_TEST_UCX_TLS",  # tests
})
"""Variables read outside the settings classes."""


def unknown_variables(
    classes: Iterable[type[BaseSettings]], environ: Mapping[str, str] | None = None
) -> list[tuple[str, str | None]]:
    """``KVCORE_*`` variables no settings class declares: (variable, closest known one)."""
    known = set(ALWAYS_KNOWN)
    for cls in classes:
        prefix = str(cls.model_config.get("env_prefix", "")).upper()
        known.update(f"{prefix}{name}".upper() for name in cls.model_fields)
    environ = os.environ if environ is None else environ
    out: list[tuple[str, str | None]] = []
    for variable in sorted(environ):
        if variable.startswith("KVCORE_") and variable not in known:
            close = difflib.get_close_matches(variable, sorted(known), n=1, cutoff=0.6)
            out.append((variable, close[0] if close else None))
    return out


def unknown_file_keys(
    classes: Iterable[type[BaseSettings]], data: Mapping[str, Any] | None = None
) -> list[tuple[str, str | None]]:
    """Keys of the ``KVCORE_CONFIG_FILE`` file no settings class reads: (key, closest known).

    Known are the core fields at the top level, each plugin's ``file_section`` as a table of
    its fields (``lmdb: {path: ...}``, reported as ``lmdb.path``) and its fields prefixed at
    the top level (``lmdb_path``).
    """
    data = _read_config_file() if data is None else data
    top: set[str] = set()
    sections: dict[str, set[str]] = {}
    for cls in classes:
        section = str(getattr(cls, "file_section", "") or "")
        fields = set(cls.model_fields)
        if section:
            sections.setdefault(section, set()).update(fields)
            top.update(f"{section}_{name}" for name in fields)
        else:
            top.update(fields)
    out: list[tuple[str, str | None]] = []
    for key, value in data.items():
        if key in sections and isinstance(value, Mapping):
            for inner in value:
                name = str(inner).lower().replace("-", "_")
                if name not in sections[key]:
                    close = difflib.get_close_matches(name, sorted(sections[key]), n=1)
                    out.append((f"{key}.{inner}", f"{key}.{close[0]}" if close else None))
        elif key not in top:
            close = difflib.get_close_matches(key, sorted(top | set(sections)), n=1)
            out.append((key, close[0] if close else None))
    return out


def check_environment(classes: Iterable[type[BaseSettings]],
                      environ: Mapping[str, str] | None = None) -> None:
    """Raise :class:`ConfigError` naming each unknown ``KVCORE_*`` variable and config-file key
    (a typo would otherwise be ignored without a word) and the closest known one."""
    classes = list(classes)
    problems = []
    unknown = unknown_variables(classes, environ)
    if unknown:
        parts = [f"{v} (did you mean {c}?)" if c else v for v, c in unknown]
        problems.append("unknown variable(s): " + ", ".join(parts))
    keys = unknown_file_keys(classes)
    if keys:
        parts = [f"{k} (did you mean {c}?)" if c else k for k, c in keys]
        problems.append(f"KVCORE_CONFIG_FILE={os.environ.get('KVCORE_CONFIG_FILE', '')!r}: "
                        "unknown key(s): " + ", ".join(parts))
    if problems:
        raise ConfigError("; ".join(problems)
                          + "; `kvcore config --reference` lists every setting")


@overload
def load_settings(**overrides: Any) -> Settings: ...


@overload
def load_settings(cls: type[S], **overrides: Any) -> S: ...


def load_settings(cls: type[Any] = Settings, **overrides: Any) -> Any:
    """Build settings from overrides, environment and config file; raise :class:`ConfigError`."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        prefix = str(cls.model_config.get("env_prefix", "KVCORE_"))
        lines = []
        for error in exc.errors():
            name = str(error["loc"][0]) if error["loc"] else "?"
            variable = f"{prefix}{name}".upper()
            shown = error.get("input")
            raw = os.environ.get(variable)
            value = raw if raw is not None else shown
            form = _accepted_form(cls, name)
            message = error["msg"].removeprefix("Value error, ")
            line = f"{variable}={value!r}: {message}"
            if form and form not in message:
                line += f" (setting: {form})"
            lines.append(line)
        raise ConfigError("invalid configuration: " + "; ".join(lines)) from None
