"""Built-in eviction policies, registered through the same hook as third-party ones."""

from __future__ import annotations

from collections.abc import Callable

from kvcore.eviction.arc import ARCPolicy
from kvcore.eviction.lru import LRUPolicy
from kvcore.eviction.prefix_lru import PrefixLRUPolicy
from kvcore.eviction.prefix_value import PrefixValuePolicy
from kvcore.eviction.s3fifo import S3FIFOPolicy
from kvcore.hookspecs import hookimpl


@hookimpl
def kvcore_register_eviction_policies(register: Callable[..., None]) -> None:
    register("lru", LRUPolicy)
    register("prefix_lru", PrefixLRUPolicy)
    register("prefix_value", PrefixValuePolicy)
    register("s3fifo", S3FIFOPolicy)
    register("arc", ARCPolicy)
