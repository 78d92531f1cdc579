"""A real vLLM engine across a restart: the second process loads an 8K-token prompt's KV from disk.

Process 1 (a new vLLM engine with kvcore, tiers cpu,lmdb) computes the prompt and exits; process 2
(another new engine, empty CPU tier) must get the prompt's KV from the lmdb tier and produce the
same tokens. TTFT of both is printed; set ``KVCORE_ASSERT_TIMING=1`` to also require the 10x
the issue asks for (tests do not time things by default: CI machines are shared).
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.vllm

testing = pytest.importorskip("kvcore_vllm.testing", reason="kvcore-vllm not installed")

CHUNK = 256
CHUNKS = 32  # 8192 tokens


def test_second_engine_loads_8k_prompt_from_disk(tmp_path) -> None:
    pytest.importorskip("vllm")  # here, not at collection: importing vLLM takes seconds
    model = testing.build_tiny_llama(tmp_path / "llama")
    prompt = testing.random_prompt(CHUNKS * CHUNK + 1, seed=7)
    warmup = testing.random_prompt(CHUNK + 1, seed=8)
    env = {"KVCORE_TIERS": "cpu,lmdb", "KVCORE_LMDB_PATH": str(tmp_path / "store"),
           "KVCORE_LMDB_SIZE": "4GiB", "KVCORE_CPU_SIZE": "2GiB",
           "KVCORE_CHUNK_SIZE": str(CHUNK)}
    steps = [
        testing.Step([warmup], max_tokens=1, label="warmup"),
        testing.Step([prompt], max_tokens=1, label="ttft"),
        testing.Step([prompt], max_tokens=8, label="output"),
        testing.Step([prompt], max_tokens=1, reset_prefix_cache=True, label="cpu-tier"),
    ]
    first = testing.run_engine(model, steps, env=env)
    assert first.steps[1].num_cached_tokens == [0]  # nothing on disk yet: recomputed
    stored = first.kvcore.get("tiers", {}).get("lmdb", {})
    assert stored.get("chunks", 0) >= CHUNKS, first.kvcore

    second = testing.run_engine(model, steps, env=env)  # a new process, a new engine
    assert second.steps[1].num_cached_tokens == [CHUNKS * CHUNK]
    assert second.steps[2].outputs == first.steps[2].outputs
    assert second.steps[1].outputs == first.steps[1].outputs
    counters = second.kvcore.get("counters", {})
    promoted = counters.get("promoted_chunks_total", {}).get("lmdb", 0)
    assert promoted >= CHUNKS, counters  # the hit came through the disk tier

    recompute, loaded = first.steps[1].seconds, second.steps[1].seconds
    in_memory = second.steps[3].seconds  # same load path, chunks already in the CPU tier
    assert second.steps[3].outputs == first.steps[1].outputs
    print(f"TTFT 8K prompt: recompute {recompute:.3f}s, from disk {loaded:.3f}s "
          f"({recompute / loaded:.1f}x), from the CPU tier {in_memory:.3f}s")
    if os.environ.get("KVCORE_ASSERT_TIMING") == "1":
        assert recompute >= 10 * loaded
