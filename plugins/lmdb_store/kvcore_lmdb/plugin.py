"""kvcore entry point: the ``lmdb`` tier, its settings and ``kvcore bench disk``."""

from __future__ import annotations

from collections.abc import Callable

from kvcore.config import load_settings
from kvcore.hookspecs import hookimpl
from kvcore.interfaces import TierContext
from kvcore_lmdb.settings import LmdbSettings
from kvcore_lmdb.tier import LmdbTier


def make_lmdb_tier(context: TierContext) -> LmdbTier:
    """Factory for ``KVCORE_TIERS=cpu,lmdb``: settings from ``KVCORE_LMDB_*``."""
    settings = load_settings(LmdbSettings)
    return LmdbTier(settings, context.make_policy, context.notify)


@hookimpl
def kvcore_register_tiers(register: Callable[..., None]) -> None:
    register("lmdb", make_lmdb_tier)


@hookimpl
def kvcore_register_settings(register: Callable[..., None]) -> None:
    register(LmdbSettings)


@hookimpl
def kvcore_register_benchmarks(register: Callable[..., None]) -> None:
    from kvcore_lmdb import bench

    register("disk", bench.add_arguments, bench.run)
