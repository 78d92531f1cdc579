"""The demo's workloads and report, without a server: real text, growing histories, sharing."""

from __future__ import annotations

from demo.client import Result
from demo.documents import SYSTEM_PROMPT, documents
from demo.report import RunSummary, same_answers
from demo.workloads import ChatWorkload, block_tokens, trace_requests


def test_documents_are_fixed_real_text() -> None:
    first, again = documents(), documents()
    assert [d.text for d in first] == [d.text for d in again]
    assert len({d.title for d in first}) == 4
    for doc in first:
        words = doc.text.split()
        assert 1200 < len(words) < 4000, (doc.title, len(words))
        assert sum(w.isalpha() for w in words) > len(words) // 2  # words, not token soup
        assert len(doc.questions) == 3


def test_chat_rounds_carry_the_answers() -> None:
    chat = ChatWorkload(users=5, rounds=2, docs=4)
    first = chat.first_round()
    assert [r.repeated_prefix for r in first] == [False, False, False, False, True]
    assert first[0].messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert first[4].messages[1]["content"].split("\n\n")[1] == \
        first[0].messages[1]["content"].split("\n\n")[1]  # user4 shares user0's document
    assert first[4].question != first[0].question
    second = chat.next_round(1, {r.user: f"answer of {r.user}" for r in first})
    assert all(r.repeated_prefix for r in second)
    history = second[2].messages
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user"]
    assert history[:2] == first[2].messages and history[2]["content"] == "answer of user2"


def test_trace_requests_keep_sharing() -> None:
    requests = list(trace_requests(None, 12, 64, 2048))
    assert len(requests) == 12 and any(r.repeated_prefix for r in requests)
    assert all(len(r.prompt) % 64 == 0 and len(r.prompt) <= 2048 for r in requests)
    assert block_tokens(5, 8) == block_tokens(5, 8) != block_tokens(6, 8)


def test_same_answers_counts_by_user_and_round() -> None:
    reqs = ChatWorkload(users=2, rounds=1).first_round()

    def run(texts: list[str]) -> RunSummary:
        return RunSummary("x", [Result(r, 0.1, 0.2, t, 10, 3) for r, t in zip(reqs, texts)],
                          1.0, 0.0)

    assert same_answers(run(["a", "b"]), run(["a", "c"])) == (1, 2)
