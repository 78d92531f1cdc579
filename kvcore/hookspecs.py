"""The plugin contract: every way a plugin extends kvcore.

A plugin is a module with functions marked ``@hookimpl`` whose names match the specs below. It is
found through the entry-point group ``kvcore`` (``[project.entry-points.kvcore] name = "pkg.mod"``)
or, for the built-ins, listed in :data:`kvcore.plugins.BUILTIN_PLUGINS`. Each hook receives a
``register`` function; the plugin calls it once per thing it contributes.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("kvcore")
hookimpl = pluggy.HookimplMarker("kvcore")


@hookspec
def kvcore_register_tiers(register: Callable[..., None]) -> None:
    """Register storage tiers: ``register(name, factory)``, factory(TierContext) -> Tier."""


@hookspec
def kvcore_register_eviction_policies(register: Callable[..., None]) -> None:
    """Register eviction policies: ``register(name, factory)``, factory() -> EvictionPolicy."""


@hookspec
def kvcore_register_codecs(register: Callable[..., None]) -> None:
    """Register chunk codecs for tiers below memory: ``register(name, factory)``,
    factory() -> Codec (chosen per tier, for example ``KVCORE_LMDB_CODEC=NAME``)."""


@hookspec
def kvcore_register_attachments(register: Callable[..., None]) -> None:
    """Register attachments: ``register(name, factory)``, factory(CacheEngine) -> Attachment or
    None (off); started with every engine, closed before its tiers."""


@hookspec
def kvcore_register_connectors(register: Callable[..., None]) -> None:
    """Register engine connectors: ``register(ConnectorInfo(...))``."""


@hookspec
def kvcore_register_settings(register: Callable[..., None]) -> None:
    """Register a plugin's settings class (a ``PluginSettings`` subclass): ``register(cls)``."""


@hookspec
def kvcore_register_benchmarks(register: Callable[..., None]) -> None:
    """Register ``kvcore bench NAME``: ``register(name, add_arguments, run)``.

    ``add_arguments(parser)`` adds options; ``run(args) -> dict`` measures and returns figures.
    """


@hookspec
def kvcore_register_commands(register: Callable[..., None]) -> None:
    """Register ``kvcore NAME`` sub-commands: ``register(name, add_parser)``.

    ``add_parser(subparsers)`` adds the sub-command and sets ``func(args) -> int`` on it.
    """
