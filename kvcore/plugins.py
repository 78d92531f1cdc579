"""Plugin loading: built-ins first, then the entry points of group ``kvcore``.

Built-in implementations (the CLI's own commands included) are plugins registered through the
same hooks as third-party ones. Each entry point is loaded and each hook implementation is called
inside its own ``try``: a plugin that fails to import or whose hook raises is recorded with its
error (``kvcore plugins`` shows it) and skipped as a whole (what it registered before the error
is rolled back); the other plugins still load. ``KVCORE_PLUGINS`` restricts which third-party
plugins load.

Registrations are checked against :data:`REGISTRATIONS`, one typed spec per kind (what
``register`` takes, what the table keeps), so a wrong call fails in the plugin that made it
with a message naming the hook.
"""

from __future__ import annotations

import functools
import importlib
import logging
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from kvcore import hookspecs
from kvcore.interfaces import AttachmentFactory, CodecFactory, ConnectorInfo

log = logging.getLogger("kvcore.plugins")

ENTRY_POINT_GROUP = "kvcore"
BUILTIN_PLUGINS: tuple[str, ...] = (
    "kvcore.cli.subcommands",
    "kvcore.tiers.cpu",
    "kvcore.eviction.builtin",
    "kvcore.trace.bench_plugin",
    "kvcore.copy.bench",
    "kvcore.control.plugin",
    "kvcore.events.kv_events",
    "kvcore.server.cache_server",
    "kvcore.codecs.builtin_codecs",
)


def _factory(kind: str) -> Callable[..., tuple[str, Any]]:
    """``register(name, factory)``: a non-empty name and a callable."""

    def spec(name: str, factory: Callable[..., Any]) -> tuple[str, Any]:
        if not isinstance(name, str) or not name:
            raise TypeError(f"kvcore_register_{kind}: the name must be a non-empty string, "
                            f"not {name!r}")
        if not callable(factory):
            raise TypeError(f"kvcore_register_{kind}: {name!r} needs a callable, "
                            f"not {type(factory).__name__}")
        return name, factory

    return spec


def _connector(connector: ConnectorInfo) -> tuple[str, Any]:
    if not isinstance(connector, ConnectorInfo):
        raise TypeError("kvcore_register_connectors: register(ConnectorInfo(...)), not "
                        f"{type(connector).__name__}")
    return connector.name, connector


def _settings_class(cls: type) -> tuple[str, Any]:
    from kvcore.config import PluginSettings

    if not (isinstance(cls, type) and issubclass(cls, PluginSettings)):
        raise TypeError("kvcore_register_settings: register(cls) takes a PluginSettings "
                        f"subclass, not {cls!r}")
    prefix = str(cls.model_config.get("env_prefix", ""))
    section = prefix.removeprefix("KVCORE_").removesuffix("_").lower()
    if not _PREFIX.fullmatch(prefix):
        raise TypeError(f"kvcore_register_settings: {cls.__name__} needs model_config = "
                        'SettingsConfigDict(env_prefix="KVCORE_<PLUGIN>_"), not '
                        f"env_prefix={prefix!r}")
    if section and cls.file_section != section:
        raise TypeError(f"kvcore_register_settings: {cls.__name__} needs file_section = "
                        f"{section!r} (its config-file table, named like its prefix), not "
                        f"{cls.file_section!r}")
    if not cls.model_config.get("frozen") or cls.model_config.get("allow_inf_nan", True):
        raise TypeError(f"kvcore_register_settings: {cls.__name__} overrides frozen or "
                        "allow_inf_nan of PluginSettings; declare only env_prefix")
    return cls.__name__, cls


_PREFIX = re.compile(r"KVCORE_(?:[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*_)?")
"""``KVCORE_<PLUGIN>_``, the name possibly of several words (``KVCORE_KV_EVENTS_``), or bare
``KVCORE_`` for a built-in's fields, such as the copy settings' ``copy_*``."""


def _benchmark(name: str, add_arguments: Callable[..., Any],
               run: Callable[..., Any]) -> tuple[str, Any]:
    _factory("benchmarks")(name, run)
    if not callable(add_arguments):
        raise TypeError(f"kvcore_register_benchmarks: {name!r} needs a callable add_arguments")
    return name, (add_arguments, run)


REGISTRATIONS: dict[str, Callable[..., tuple[str, Any]]] = {
    "commands": _factory("commands"),
    "tiers": _factory("tiers"),
    "eviction_policies": _factory("eviction_policies"),
    "attachments": _factory("attachments"),
    "codecs": _factory("codecs"),
    "connectors": _connector,
    "settings": _settings_class,
    "benchmarks": _benchmark,
}
"""For each kind: what its hook's ``register`` takes, turned into the (name, value) its table
keeps. The keys are the registry's tables and the ``kvcore_register_<kind>`` hooks."""
KINDS = tuple(REGISTRATIONS)


@dataclass
class PluginInfo:
    """One plugin as discovered: where it came from, what it registered, what went wrong."""

    name: str
    module: str
    distribution: str
    version: str
    builtin: bool
    registers: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "module": self.module,
            "distribution": self.distribution,
            "version": self.version,
            "builtin": self.builtin,
            "registers": self.registers,
            "error": self.error,
        }


class PluginRegistry:
    """Everything the loaded plugins registered, by kind and name."""

    def __init__(self) -> None:
        self.manager = pluggy.PluginManager("kvcore")
        self.manager.add_hookspecs(hookspecs)
        self.plugins: list[PluginInfo] = []
        self.tiers: dict[str, Callable[..., Any]] = {}
        self.eviction_policies: dict[str, Callable[..., Any]] = {}
        self.attachments: dict[str, AttachmentFactory] = {}
        self.codecs: dict[str, CodecFactory] = {}
        self.connectors: dict[str, ConnectorInfo] = {}
        self.settings: dict[str, type] = {}
        self.benchmarks: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {}
        self.commands: dict[str, Callable[..., Any]] = {}

    # -- loading -------------------------------------------------------------------------------

    def load(self, allow: Iterable[str] | None = None) -> PluginRegistry:
        """Load built-ins and entry points (only those in ``allow`` when it is given)."""
        version = _distribution_version("kvcore")
        for module_name in BUILTIN_PLUGINS:
            info = PluginInfo(module_name.rsplit(".", 1)[-1], module_name, "kvcore", version, True)
            self._load_module(info, functools.partial(importlib.import_module, module_name))
        allowed = set(allow) if allow is not None else None
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "?"
            if allowed is not None and ep.name not in allowed and dist not in allowed:
                log.info("plugin %s (%s) not in KVCORE_PLUGINS; skipped", ep.name, dist)
                continue
            info = PluginInfo(ep.name, ep.value, dist, _distribution_version(dist), False)
            self._load_module(info, ep.load)
        self._drop_unknown_hooks()
        return self

    def _drop_unknown_hooks(self) -> None:
        """A plugin implementing a hook kvcore does not define (a typo, a hook from another
        kvcore version) is recorded as failed and skipped, like one whose hook raises."""
        for _ in range(len(self.plugins) + 1):
            try:
                self.manager.check_pending()
                return
            except pluggy.PluginValidationError as exc:
                name = self.manager.get_name(exc.plugin)
                info = next((p for p in self.plugins if p.name == name), None)
                log.warning("kvcore plugin %s skipped: %s", name, exc)
                if info is None:
                    self.manager.unregister(exc.plugin)
                    continue
                info.error = f"PluginValidationError: {exc}"
                self._roll_back(info, exc.plugin)

    def register_module(self, module: Any, name: str | None = None) -> PluginInfo:
        """Register an already-imported plugin module or object (tests, embedding)."""
        plugin_name = str(name or getattr(module, "__name__", None) or repr(module))
        info = PluginInfo(plugin_name, plugin_name, "-", "-", False)
        self._load_module(info, lambda: module)
        return info

    def _load_module(self, info: PluginInfo, load: Callable[[], Any]) -> None:
        self.plugins.append(info)
        try:
            module = load()
            if self.manager.is_registered(module):
                info.error = "already registered under another name"
                return
            self.manager.register(module, name=info.name)
        except Exception as exc:  # a broken plugin must not take the process down
            info.error = f"{type(exc).__name__}: {exc}"
            log.warning("kvcore plugin %s failed to load: %s", info.name, info.error)
            return
        for kind in KINDS:
            if not self._call_hook(info, kind):
                self._roll_back(info, module)
                return

    def _call_hook(self, info: PluginInfo, kind: str) -> bool:
        """Run ``info``'s ``kvcore_register_<kind>``; False (error recorded) if it raised."""
        hook = getattr(self.manager.hook, f"kvcore_register_{kind}")
        for impl in hook.get_hookimpls():
            if impl.plugin_name != info.name:
                continue
            registered: list[str] = info.registers.setdefault(kind, [])
            try:
                impl.function(register=self._registrar(kind, registered))
            except Exception as exc:  # a broken plugin must not take the process down
                info.error = f"{type(exc).__name__} in kvcore_register_{kind}: {exc}"
                log.warning("kvcore plugin %s failed to register and is skipped: %s",
                            info.name, info.error)
                return False
            finally:
                if not registered:
                    del info.registers[kind]
        return True

    def _roll_back(self, info: PluginInfo, module: Any) -> None:
        """Undo everything ``info`` registered: a plugin loads whole or not at all."""
        for kind, names in info.registers.items():
            table: dict[str, Any] = getattr(self, kind)
            for name in names:
                table.pop(name, None)
        info.registers = {}
        try:
            self.manager.unregister(module)
        except Exception as exc:  # noqa: BLE001 - already recorded as failed
            log.debug("kvcore plugin %s: unregister failed: %s", info.name, exc)

    def _registrar(self, kind: str, registered: list[str]) -> Callable[..., None]:
        table: dict[str, Any] = getattr(self, kind)
        spec = REGISTRATIONS[kind]

        def register(*args: Any, **kwargs: Any) -> None:
            name, value = spec(*args, **kwargs)
            if name in table:
                raise ValueError(f"{kind[:-1].replace('_', ' ')} {name!r} is already registered")
            table[name] = value
            registered.append(name)

        return register

    # -- lookups with clear errors --------------------------------------------------------------

    def tier_factory(self, name: str) -> Callable[..., Any]:
        return _lookup(self.tiers, name, "tier", "KVCORE_TIERS", self)

    def policy_factory(self, name: str) -> Callable[..., Any]:
        return _lookup(self.eviction_policies, name, "eviction policy", "KVCORE_EVICTION", self)

    def codec_factory(self, name: str, variable: str) -> CodecFactory:
        """The factory of codec ``name``, configured by ``variable`` (named in the error)."""
        return _lookup(self.codecs, name, "codec", variable, self)

    def failed(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.error]


def _lookup(
    table: dict[str, Any], name: str, what: str, variable: str, registry: PluginRegistry
) -> Any:
    from kvcore.config import ConfigError

    if name in table:
        return table[name]
    known = ", ".join(sorted(table)) or "none"
    hint = ""
    broken = [p.name for p in registry.failed()]
    if broken:
        hint = f" (plugins that failed to load: {', '.join(broken)}; see `kvcore plugins`)"
    raise ConfigError(f"{variable}: unknown {what} {name!r}; known: {known}{hint}")


def _distribution_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


_registries: dict[frozenset[str] | None, PluginRegistry] = {}
_registries_lock = threading.Lock()


_FROM_SETTINGS: Any = object()


def get_registry(
    allow: Iterable[str] | None = _FROM_SETTINGS, *, reload: bool = False
) -> PluginRegistry:
    """The process-wide registry for ``allow``, loaded once per allow-list.

    ``allow`` defaults to the ``KVCORE_PLUGINS`` setting (``None`` loads every plugin); a
    different allow-list gets its own registry, so it is honoured after the first load too.
    """
    if allow is _FROM_SETTINGS:
        from kvcore.config import load_settings

        allow = load_settings().plugins
    key = frozenset(allow) if allow is not None else None
    with _registries_lock:
        if reload or key not in _registries:
            _registries[key] = PluginRegistry().load(allow)
        return _registries[key]
