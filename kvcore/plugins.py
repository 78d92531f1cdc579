"""Plugin loading: built-ins first, then the entry points of group ``kvcore``.

Built-in implementations are plugins registered through the same hooks as third-party ones. Each
entry point is loaded and each hook implementation is called inside its own ``try``: a plugin that
fails to import or to register is recorded with its error (``kvcore plugins`` shows it) and
skipped; the other plugins still load. ``KVCORE_PLUGINS`` restricts which third-party plugins load.
"""

from __future__ import annotations

import functools
import importlib
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from kvcore import hookspecs
from kvcore.interfaces import ConnectorInfo

log = logging.getLogger("kvcore.plugins")

ENTRY_POINT_GROUP = "kvcore"
BUILTIN_PLUGINS: tuple[str, ...] = (
    "kvcore.tiers.cpu",
    "kvcore.eviction.builtin",
    "kvcore.trace.bench_plugin",
    "kvcore.copy.bench",
    "kvcore.control.plugin",
)
KINDS = (
    "tiers", "eviction_policies", "transports", "connectors", "settings", "benchmarks", "commands",
)


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
        self.transports: dict[str, Callable[..., Any]] = {}
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
        self.manager.check_pending()
        return self

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
            self._call_hook(info, kind)

    def _call_hook(self, info: PluginInfo, kind: str) -> None:
        hook = getattr(self.manager.hook, f"kvcore_register_{kind}")
        for impl in hook.get_hookimpls():
            if impl.plugin_name != info.name:
                continue
            registered: list[str] = []
            try:
                impl.function(register=self._registrar(kind, info, registered))
            except Exception as exc:
                info.error = f"{type(exc).__name__} in kvcore_register_{kind}: {exc}"
                log.warning("kvcore plugin %s failed to register: %s", info.name, info.error)
            if registered:
                info.registers.setdefault(kind, []).extend(registered)

    def _registrar(
        self, kind: str, info: PluginInfo, registered: list[str]
    ) -> Callable[..., None]:
        table: dict[str, Any] = getattr(self, kind)

        def register(*args: Any) -> None:
            if kind == "connectors":
                (connector,) = args
                name, value = connector.name, connector
            elif kind == "settings":
                (cls,) = args
                name, value = cls.__name__, cls
            elif kind == "benchmarks":
                name, add_arguments, run = args
                value = (add_arguments, run)
            else:
                name, value = args
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

    def transport_factory(self, name: str) -> Callable[..., Any]:
        return _lookup(self.transports, name, "transport", "KVCORE_TRANSPORT", self)

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


_default: PluginRegistry | None = None
_default_lock = threading.Lock()


_FROM_SETTINGS: Any = object()


def get_registry(
    allow: Iterable[str] | None = _FROM_SETTINGS, *, reload: bool = False
) -> PluginRegistry:
    """The process-wide registry, loaded once.

    ``allow`` defaults to the ``KVCORE_PLUGINS`` setting (``None`` loads every plugin).
    """
    global _default
    with _default_lock:
        if _default is None or reload:
            if allow is _FROM_SETTINGS:
                from kvcore.config import load_settings

                allow = load_settings().plugins
            _default = PluginRegistry().load(allow)
        return _default
