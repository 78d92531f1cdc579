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
ATTENTION_TOKENS = 32768
"""Context length at which a token's attention costs as much as the rest of its prefill (about
32K for Llama-3-8B: 4 x 4096 x 32 FLOPs per context token against 2 x 8e9 per token): a block
at context ``c`` costs ``1 + c / ATTENTION_TOKENS`` times a block at the start."""


def prefix_cost(run: int, block_tokens: int = BLOCK_TOKENS,
                attention_tokens: int = ATTENTION_TOKENS) -> float:
    """Prefill cost of a prompt's first ``run`` blocks, in blocks at context 0 (later blocks
    cost more: they attend to everything before them)."""
    step = block_tokens / attention_tokens
    return run + step * run * run / 2


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
    saved_cost: float = 0.0
    """Prefill cost of the hit blocks (:func:`prefix_cost`)."""
    total_cost: float = 0.0

    @property
    def hit_ratio(self) -> float:
        return self.hit_blocks / self.blocks if self.blocks else 0.0

    @property
    def saved_prefill_ratio(self) -> float:
        """The share of all prefill time the hits saved."""
        return self.saved_cost / self.total_cost if self.total_cost else 0.0


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
    saved = total = 0.0
    started = time.perf_counter()
    tiers = None
    if not isinstance(policy, str):
        tiers = [CpuTier(settings.cpu_size, policy())]
    with CacheEngine(settings, tiers=tiers) as engine:
        for keys in requests:
            if not keys:
                continue
            run = engine.lookup(keys, prefetch=False).chunks
            hits += run
            blocks += len(keys)
            saved += prefix_cost(run)
            total += prefix_cost(len(keys))
            engine.store_buffers(keys, [payload] * len(keys)).wait()
        memory = engine.memory
        evictions = memory.evictions if isinstance(memory, CpuTier) else 0
    seconds = time.perf_counter() - started
    return ReplayResult(name, capacity, len(requests), blocks, hits, evictions, seconds,
                        saved, total)


def belady_ratios(requests: Sequence[Sequence[Block]], capacity: int) -> tuple[float, float]:
    """Hit ratio and saved-prefill ratio of Belady's policy (which maximises hits) at
    ``capacity`` blocks."""
    runs: list[int] = []
    hits, total = belady_hits(requests, capacity, runs=runs)
    if not total:
        return 0.0, 0.0
    cost = sum(prefix_cost(len(r)) for r in requests)
    return hits / total, sum(prefix_cost(r) for r in runs) / cost if cost else 0.0
