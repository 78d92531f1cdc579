"""Registers the ``redis`` tier, its settings and ``kvcore bench redis``."""

from __future__ import annotations

from collections.abc import Callable

from kvcore.config import load_settings
from kvcore.hookspecs import hookimpl
from kvcore.interfaces import TierContext


def make_tier(context: TierContext):  # type: ignore[no-untyped-def]
    from kvcore_redis.settings import RedisSettings
    from kvcore_redis.tier import RedisTier

    return RedisTier(load_settings(RedisSettings), name=context.name)


@hookimpl
def kvcore_register_tiers(register: Callable[..., None]) -> None:
    register("redis", make_tier)


@hookimpl
def kvcore_register_settings(register: Callable[..., None]) -> None:
    from kvcore_redis.settings import RedisSettings

    register(RedisSettings)


@hookimpl
def kvcore_register_benchmarks(register: Callable[..., None]) -> None:
    from kvcore_redis import bench

    register("redis", bench.add_arguments, bench.run)
