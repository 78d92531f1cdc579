"""A real instruct model (SmolLM2-135M-Instruct) chatting through vLLM, with and without kvcore.

Two chats over two documents, three turns each, through ``LLM.chat`` with the model's chat
template and greedy decoding. With kvcore, vLLM's own prefix cache is dropped before every later
turn, so the history those turns find cached came from kvcore's CPU tier; the reference run has
no connector and recomputes every prompt in full. The answers must be the same tokens.
Two engine starts (about 20 s each) plus the one-time GGUF conversion (about 20-50 s, cached).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vllm

CHUNK = 256  # kvcore's default chunk size

SYSTEM = ("You are a helpful assistant. Answer questions about the document the user gives you "
          "in one or two short sentences, using the document's own words.")

FERRY = (
    "The Tarn Ferry runs between the villages of Oakhurst and Wenlow across the lake. The boat "
    "is called the Marigold; she was built in 1962 and carries twelve passengers and two "
    "bicycles. The crossing takes twenty minutes in calm water. The ferry does not run when the "
    "wind is above force six, and the ferryman decides on the day. Tickets cost three crowns "
    "for adults and one crown for children; dogs travel free. "
)
GARDEN = (
    "The community garden on Elm Lane has thirty plots, each five metres by ten. A plot costs "
    "eight crowns a year, paid every March to the treasurer, Ruth Ambler. Members must keep "
    "their paths clear and may not grow trees taller than two metres. Water comes from two "
    "rain tanks behind the shed; the mains tap is only for the dry weeks of July and August. "
)


def _document(paragraph: str, log_lines: str, entries: int) -> str:
    lines = [log_lines.format(n=n, m=(7 * n) % 31 + 1, h=6 + n % 12) for n in range(1, entries)]
    return paragraph + "\n\nThe log book:\n" + "\n".join(lines)


def _chats():
    from kvcore_vllm.chat import Chat

    ferry = _document(FERRY, "Entry {n}: the Marigold crossed {m} times and left Oakhurst at "
                             "{h} o'clock for the first crossing.", 60)
    garden = _document(GARDEN, "Entry {n}: plot {m} was dug over and planted with beans; the "
                               "tanks were full at {h} in the morning.", 60)
    return [
        Chat(SYSTEM, [f"{ferry}\n\nWhat is the ferry boat called?",
                      "How long does the crossing take?", "How much does a child's ticket cost?"]),
        Chat(SYSTEM, [f"{garden}\n\nHow much does a plot cost?",
                      "Who is the treasurer?", "Where does the water come from?"]),
    ]


@pytest.fixture(scope="module")
def smollm():
    from kvcore_vllm.smollm import SmolLMUnavailable, build_smollm

    try:
        return build_smollm()
    except SmolLMUnavailable as exc:  # pragma: no cover - `make install` installs it
        pytest.skip(str(exc))


def test_multi_turn_chat_hits_kvcore_and_answers_the_same(smollm) -> None:
    from kvcore_vllm.chat import run_chat

    chats = _chats()
    cached = run_chat(smollm, chats, connector=True, reset_prefix_cache=True, max_tokens=24,
                      env={"KVCORE_CPU_SIZE": "1GiB"})
    alone = run_chat(smollm, chats, connector=False, reset_prefix_cache=True, max_tokens=24)

    by_turn = {(t.chat, t.turn): t for t in cached.turns}
    for chat in range(len(chats)):
        first = by_turn[(chat, 0)]
        assert first.prompt_tokens > 6 * CHUNK, "the document should span several chunks"
        for turn in (1, 2):
            earlier, later = by_turn[(chat, turn - 1)], by_turn[(chat, turn)]
            assert later.prompt_tokens > earlier.prompt_tokens
            # vLLM's cache was reset: everything cached now is kvcore's, at least every whole
            # chunk of the previous turn's prompt (the history is a prefix of this prompt).
            assert later.num_cached_tokens >= (earlier.prompt_tokens // CHUNK) * CHUNK
            assert later.num_cached_tokens % CHUNK == 0
    assert all(t.num_cached_tokens == 0 for t in alone.turns), "the reference must recompute"
    loaded = sum(by_turn[(c, t)].num_cached_tokens for c in range(len(chats)) for t in (1, 2))
    assert cached.connector.get("vllm_loaded_tokens_total") == loaded
    assert not cached.connector.get("vllm_load_error_blocks_total")

    # The model answers in words (a real model, a real tokenizer), the same with and without.
    assert all(any(c.isalpha() for c in t.answer) for t in alone.turns)
    assert [t.answer for t in cached.turns] == [t.answer for t in alone.turns]
    assert cached.answers() == alone.answers()
