"""Replay a trace through kvcore's real engine, CPU tier and eviction policy.

Each request looks up its blocks (a hit is the leading run of cached blocks, as in a prefix
cache; the lookup touches them), then stores all of them synchronously (the engine skips the
ones already cached, reserves the rest under the tier's byte budget and lets the policy choose
victims). The budget is ``capacity`` blocks of a small payload.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvcore.config import load_settings
from kvcore.engine import CacheEngine
from kvcore.interfaces import EvictionPolicy
from kvcore.keys import ChunkKey
from kvcore.tiers.cpu import CpuTier
from kvcore.trace.belady import belady_hits
from kvcore.trace.format import BLOCK_TOKENS, Request
from kvcore.trace.keys import BlockKeys
from kvcore.trace.truncate import Block, Truncation, request_blocks

PAYLOAD_BYTES = 64
"""Bytes stored per block: the replay measures hits, not copies."""


@dataclass
class ReplayResult:
    """What one replay of one policy measured."""

    policy: str
    capacity_blocks: int
    requests: int
    blocks: int
    hit_blocks: int
    evictions: int
    seconds: float

    @property
    def hit_ratio(self) -> float:
        return self.hit_blocks / self.blocks if self.blocks else 0.0


def prepare(
    requests: Sequence[Request], truncation: Truncation | None = None
) -> tuple[list[list[Block]], int, int]:
    """Blocks of every request after truncation; input tokens before and after."""
    truncation = truncation or Truncation()
    out, before, after = [], 0, 0
    for request in requests:
        blocks, kept = request_blocks(request, truncation)
        out.append(blocks)
        before += request.input_length
        after += kept
    return out, before, after


def to_keys(blocks: Sequence[Sequence[Block]]) -> list[list[ChunkKey]]:
    """Chunk keys of every request's blocks."""
    keys = BlockKeys()
    return [[keys.key(i, derived) for derived, i in row] for row in blocks]


def replay(
    requests: Sequence[Sequence[ChunkKey]],
    capacity: int,
    policy: str | Callable[[], EvictionPolicy] = "lru",
) -> ReplayResult:
    """Replay keyed requests through a :class:`CacheEngine` whose CPU tier holds ``capacity``.

    ``policy`` is a registered policy name (the engine builds its tiers from settings) or a
    factory of a policy instance (the CPU tier is built around it).
    """
    name = policy if isinstance(policy, str) else getattr(policy, "name", "custom")
    settings = load_settings(
        chunk_size=BLOCK_TOKENS,
        tiers=["cpu"],
        cpu_size=capacity * PAYLOAD_BYTES,
        eviction=name if isinstance(policy, str) else "lru",
        write_behind=False,
        store_queue_size=4,
    )
    payload = bytes(PAYLOAD_BYTES)
    hits = blocks = 0
    started = time.perf_counter()
    tiers = None
    if not isinstance(policy, str):
        tiers = [CpuTier(settings.cpu_size, policy())]
    with CacheEngine(settings, tiers=tiers) as engine:
        for keys in requests:
            if not keys:
                continue
            hits += engine.lookup(keys, prefetch=False).chunks
            blocks += len(keys)
            engine.store_buffers(keys, [payload] * len(keys)).wait()
        memory = engine.memory
        evictions = memory.evictions if isinstance(memory, CpuTier) else 0
    seconds = time.perf_counter() - started
    return ReplayResult(name, capacity, len(requests), blocks, hits, evictions, seconds)


def belady_ratio(requests: Sequence[Sequence[Block]], capacity: int) -> float:
    """Hit ratio of Belady's clairvoyant policy at ``capacity`` blocks."""
    hits, total = belady_hits(requests, capacity)
    return hits / total if total else 0.0
