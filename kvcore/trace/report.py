"""One replay report: a policy against LRU and Belady at one capacity, optional truncation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvcore.trace.format import Request
from kvcore.trace.replay import ATTENTION_TOKENS, belady_ratios, prepare, replay, to_keys
from kvcore.trace.truncate import Truncation


def compare(requests: Sequence[Request], capacity: int, policy: str,
            truncation: Truncation | None = None) -> dict[str, Any]:
    """Hit ratios of ``policy``, LRU and Belady on the same blocks, plus replay speed."""
    blocks, tokens_in, tokens_kept = prepare(requests, truncation)
    keys = to_keys(blocks)
    main = replay(keys, capacity, policy)
    lru = main if policy == "lru" else replay(keys, capacity, "lru")
    belady, belady_saved = belady_ratios(blocks, capacity)
    return {
        "policy": policy,
        "capacity_blocks": capacity,
        "requests": main.requests,
        "blocks": main.blocks,
        "unique_blocks": len({b for row in blocks for b in row}),
        "hit_ratio": main.hit_ratio,
        "lru_hit_ratio": lru.hit_ratio,
        "belady_hit_ratio": belady,
        "ratio_to_belady": main.hit_ratio / belady if belady else 0.0,
        "lru_ratio_to_belady": lru.hit_ratio / belady if belady else 0.0,
        "saved_prefill_ratio": main.saved_prefill_ratio,
        "lru_saved_prefill_ratio": lru.saved_prefill_ratio,
        "belady_saved_prefill_ratio": belady_saved,
        "attention_tokens": ATTENTION_TOKENS,
        "evictions": main.evictions,
        "replay_requests_per_s": main.requests / main.seconds if main.seconds else 0.0,
        "input_tokens": tokens_in,
        "kept_tokens": tokens_kept,
    }
