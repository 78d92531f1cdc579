"""A complete, small kvcore plugin: one of each thing a third party usually adds.

- the tier ``example`` (:mod:`.tier`): values in a byte-budgeted dict, ``KVCORE_TIERS=cpu,example``;
- the eviction policy ``example_fifo`` (:mod:`.policy`): ``KVCORE_EVICTION=example_fifo``;
- the attachment ``example_usage_log`` (:mod:`.attachment`): logs tier usage beside every
  engine when ``KVCORE_EXAMPLE_USAGE_LOG_S`` > 0;
- their settings (:mod:`.settings`, ``KVCORE_EXAMPLE_*``).

This module is the entry point (``[project.entry-points.kvcore] example = "kvcore_example_tier"``):
it holds only the hook implementations and the names a user imports; the attachment's module is
imported when its hook runs.
"""

from __future__ import annotations

from collections.abc import Callable

from kvcore.hookspecs import hookimpl
from kvcore_example_tier.policy import FifoPolicy
from kvcore_example_tier.settings import ExampleSettings
from kvcore_example_tier.tier import DictTier, make_tier

__all__ = ["DictTier", "ExampleSettings", "FifoPolicy"]


@hookimpl
def kvcore_register_tiers(register: Callable[..., None]) -> None:
    register("example", make_tier)


@hookimpl
def kvcore_register_eviction_policies(register: Callable[..., None]) -> None:
    register("example_fifo", FifoPolicy)


@hookimpl
def kvcore_register_attachments(register: Callable[..., None]) -> None:
    from kvcore_example_tier.attachment import start_usage_log

    register("example_usage_log", start_usage_log)


@hookimpl
def kvcore_register_settings(register: Callable[..., None]) -> None:
    register(ExampleSettings)
