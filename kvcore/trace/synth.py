"""Synthetic traces in the Mooncake format with a chosen sharing structure (tests, benchmarks).

- ``conversations``: multi-turn chats under a few shared system prompts; each turn extends the
  previous one, so new suffix blocks *are* reused (the opposite of one-off questions).
- ``documents``: questions over a Zipf-popular set of long documents, mixed with one-off scans.
"""

from __future__ import annotations

import random

from kvcore.trace.format import BLOCK_TOKENS, Request


class _FreshIds:
    """``fresh(n)``: n block ids never handed out before."""

    def __init__(self) -> None:
        self.next_id = 0

    def __call__(self, n: int) -> list[int]:
        ids = list(range(self.next_id, self.next_id + n))
        self.next_id += n
        return ids


def conversations(n_requests: int = 2000, seed: int = 0, prompts: int = 8,
                  active: int = 64) -> list[Request]:
    """Interleaved multi-turn conversations sharing ``prompts`` system prompts."""
    rng = random.Random(seed)
    fresh = _FreshIds()

    heads = [fresh(rng.randint(2, 6)) for _ in range(prompts)]
    chats: list[list[int]] = []
    out = []
    for t in range(n_requests):
        if len(chats) < active or rng.random() < 0.1:
            chat = list(rng.choice(heads)) + fresh(rng.randint(1, 4))
            if len(chats) >= active:
                chats.pop(rng.randrange(len(chats)))
            chats.append(chat)
        else:
            chat = rng.choice(chats)
            chat.extend(fresh(rng.randint(1, 3)))
        out.append(_request(t, chat))
    return out


def documents(n_requests: int = 2000, seed: int = 0, docs: int = 300,
              scan_share: float = 0.3) -> list[Request]:
    """Questions over Zipf-popular long documents, plus one-off long scans."""
    rng = random.Random(seed)
    fresh = _FreshIds()

    corpus = [fresh(rng.randint(4, 40)) for _ in range(docs)]
    weights = [1.0 / (rank + 1) for rank in range(docs)]
    out = []
    for t in range(n_requests):
        if rng.random() < scan_share:
            ids = fresh(rng.randint(20, 80))
        else:
            ids = list(rng.choices(corpus, weights)[0]) + fresh(rng.randint(1, 2))
        out.append(_request(t, ids))
    return out


def _request(t: int, ids: list[int]) -> Request:
    return Request(timestamp=t * 100, input_length=len(ids) * BLOCK_TOKENS - BLOCK_TOKENS // 2,
                   output_length=64, hash_ids=tuple(ids))


def to_jsonl(requests: list[Request]) -> str:
    """Requests as trace lines."""
    import json

    return "".join(json.dumps({"timestamp": r.timestamp, "input_length": r.input_length,
                               "output_length": r.output_length,
                               "hash_ids": list(r.hash_ids)}) + "\n" for r in requests)
