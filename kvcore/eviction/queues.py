"""Helpers shared by the queue-based policies."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container

from kvcore.keys import ChunkKey


def first_not_in(queue: OrderedDict[ChunkKey, None],
                 exclude: Container[ChunkKey]) -> ChunkKey | None:
    """The first (oldest) key of ``queue`` not in ``exclude``."""
    return next((k for k in queue if k not in exclude), None)
