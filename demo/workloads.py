"""Workloads as prompts in words ``w3`` .. ``w31999`` (one token each with the demo tokenizer).

- :class:`ChatWorkload`: several users, each with a document (some long), a shared system prompt,
  and rounds of questions whose history grows with the model's real answers. Requests go out
  round-robin over users, so with a small engine KV pool each user's history has been pushed out
  of the engine by the time the user asks again: that is what kvcore keeps.
- :func:`mooncake_requests`: the shipped Mooncake trace, token ids derived deterministically
  from each hash id (a seeded generator per id), block length scaled down, sharing kept.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FIRST_WORD, LAST_WORD = 3, 31999


def words(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"w{i}" for i in rng.integers(FIRST_WORD, LAST_WORD + 1, n)]


@dataclass
class Request:
    """One completion request and what it is for."""

    user: str
    round: int
    prompt: str
    repeated_prefix: bool
    """True when an earlier request already sent this request's prefix (beyond the system prompt)."""
    max_tokens: int = 32
    tokens: int = 0


@dataclass
class ChatWorkload:
    users: int = 4
    rounds: int = 3
    system_tokens: int = 1024
    doc_tokens: tuple[int, ...] = (3072, 6144, 2048, 7168)
    question_tokens: int = 64
    answer_tokens: int = 32
    seed: int = 7
    _history: dict[str, list[str]] = field(default_factory=dict)

    def first_round(self) -> list[Request]:
        system = words(self.seed, self.system_tokens)
        requests = []
        for u in range(self.users):
            user = f"user{u}"
            doc = words(self.seed * 1000 + u, self.doc_tokens[u % len(self.doc_tokens)])
            self._history[user] = system + doc
            requests.append(self._ask(user, 0))
        return requests

    def next_round(self, round_: int, answers: dict[str, str]) -> list[Request]:
        requests = []
        for user, answer in answers.items():
            self._history[user] += answer.split()[: self.answer_tokens]
            requests.append(self._ask(user, round_))
        return requests

    def _ask(self, user: str, round_: int) -> Request:
        question = words(hash_seed(user, round_, self.seed), self.question_tokens)
        self._history[user] = self._history[user] + question
        prompt = self._history[user]
        return Request(user, round_, " ".join(prompt), round_ > 0, self.answer_tokens, len(prompt))


def hash_seed(user: str, round_: int, seed: int) -> int:
    return seed * 7919 + int(user.removeprefix("user")) * 104729 + round_ * 1299709


def mooncake_requests(trace: Path, limit: int, block_tokens: int, max_tokens_total: int,
                      output_tokens: int = 16) -> Iterator[Request]:
    """Requests of a Mooncake-format trace, blocks of 512 tokens scaled to ``block_tokens``.

    Only requests of prefix families (first block id used by two or more requests of the
    trace) are replayed, in trace order: the first ``limit`` requests of the file share nothing,
    and a short demo would show no reuse at all. The sharing among them is kept as it is.
    """
    records = [json.loads(line) for line in open(trace) if line.strip()]
    family_sizes: dict[int, int] = {}
    for record in records:
        if record["hash_ids"]:
            first = record["hash_ids"][0]
            family_sizes[first] = family_sizes.get(first, 0) + 1
    seen: set[int] = set()
    sent = 0
    for n, record in enumerate(records):
        if sent >= limit:
            break
        if not record["hash_ids"] or family_sizes[record["hash_ids"][0]] < 2:
            continue
        ids = record["hash_ids"][: max(1, (max_tokens_total - output_tokens) // block_tokens)]
        tokens: list[str] = []
        for hash_id in ids:
            tokens += words(1_000_003 + int(hash_id), block_tokens)
        repeated = ids[0] in seen
        seen.update(ids)
        sent += 1
        yield Request(f"trace{n}", 0, " ".join(tokens), repeated, output_tokens, len(tokens))
