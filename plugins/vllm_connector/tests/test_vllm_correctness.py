"""Issue 15 on a real vLLM engine: a cache hit never changes the model's output.

One engine runs kvcore (through vLLM's MultiConnector, over a CPU tier of four chunks and a
slow lower tier) with one fault injected: the first load of two or more chunks gets only its
first chunk (the second is late). A second engine, plain vLLM, gives the reference outputs.
Greedy outputs of a random-weight model are compared between runs that compute the same
number of tokens: the reference's repeat of a prompt hits vLLM's own prefix cache.
"""

from __future__ import annotations

import pytest

from kvcore_vllm.testing import Step, random_prompt, run_engine

pytestmark = pytest.mark.vllm

CHUNK, BLOCK = 256, 128


@pytest.fixture(scope="module")
def prompts() -> dict[str, list[int]]:
    a2 = random_prompt(2 * CHUNK + 1, seed=1)
    a4 = a2[:2 * CHUNK] + random_prompt(2 * CHUNK + 1, seed=2)
    return {
        "a2": a2,  # stored first: two chunks
        "a4": a4,  # extends a2: its load of a2's two chunks fails part-way
        "a5": a4[:4 * CHUNK] + random_prompt(1, seed=3),  # extends a4: must hit all 4 right
        "b": random_prompt(4 * CHUNK, seed=4),  # exactly 4 chunks
        "c": random_prompt(4 * CHUNK + 1, seed=5),  # later served from the slow tier
        "filler": random_prompt(4 * CHUNK + 1, seed=6),
        "x": random_prompt(5 * CHUNK + 1, seed=7),  # x and y decode together: one is preempted
        "y": random_prompt(5 * CHUNK + 1, seed=8),
    }


@pytest.fixture(scope="module")
def reference(tiny_llama, prompts) -> dict:
    """Plain vLLM: each prompt cold, then again from vLLM's own prefix cache."""
    steps = []
    for name in ("a5", "b", "c", "x", "y"):
        steps += [Step([prompts[name]], label=f"{name}-cold"),
                  Step([prompts[name]], label=f"{name}-local")]
    result = run_engine(tiny_llama, steps, connector=False)
    return {s.label: s for s in result.steps}


def test_hits_after_failed_loads_whole_chunks_and_async_loads_equal_a_clean_engine(
        tiny_llama, prompts, reference) -> None:
    p = prompts
    faulty = run_engine(
        tiny_llama,
        [
            Step([p["a2"]], label="a2"),
            Step([p["a4"]], reset_prefix_cache=True, label="a4-late-chunk"),
            Step([p["a5"]], reset_prefix_cache=True, label="a5-hit"),
            Step([p["b"]], label="b-cold"),
            Step([p["b"]], reset_prefix_cache=True, label="b-hit"),
            Step([p["c"]], label="c-cold"),
            Step([p["filler"]], label="filler"),  # pushes c out of the 4-chunk CPU tier
            Step([p["c"]], reset_prefix_cache=True, label="c-async"),
        ],
        setup="kvcore_vllm.testing:inject_late_chunk_once",
        multi_connector=True,
        env={"KVCORE_TIERS": "cpu,faulty-slow", "KVCORE_CPU_SIZE": "8MiB",
             "KVCORE_VERIFY_SAMPLE": "0"},
    )
    got = {s.label: s for s in faulty.steps}
    ref = reference
    counters = faulty.connector
    # (1), (2): the late chunk was reported and recomputed, inside MultiConnector, without an
    # error; nothing computed over it was stored, and the later hit is right.
    assert counters.get("vllm_load_error_blocks_total", 0) >= 2
    assert counters.get("vllm_stores_dropped_total", 0) >= 2
    assert len(got["a4-late-chunk"].outputs[0]) == 4  # not FINISHED_ERROR
    assert got["a5-hit"].num_cached_tokens == [4 * CHUNK]
    assert ref["a5-local"].num_cached_tokens == [4 * CHUNK]
    assert got["a5-hit"].outputs == ref["a5-local"].outputs
    # (5): a prompt of exactly 4 chunks recomputes one block, like vLLM's own prefix cache.
    assert got["b-hit"].num_cached_tokens == [4 * CHUNK - BLOCK]
    assert ref["b-local"].num_cached_tokens == [4 * CHUNK - BLOCK]
    assert got["b-hit"].outputs == ref["b-local"].outputs
    # (6): c came back from the slow lower tier asynchronously, with the same output.
    assert counters.get("vllm_async_loads_total", 0) >= 1
    assert got["c-async"].num_cached_tokens == [4 * CHUNK]
    assert got["c-async"].outputs == ref["c-local"].outputs


def test_preempted_requests_store_their_prompts(tiny_llama, prompts, reference) -> None:
    """(3) Two 10-block prompts decode 300 tokens each in a 24-block pool: vLLM preempts one.
    Both prompts end up whole in kvcore, and later hits equal a clean engine's output."""
    p = prompts
    result = run_engine(
        tiny_llama,
        [
            Step([p["x"], p["y"]], max_tokens=300, label="together"),
            Step([p["x"]], reset_prefix_cache=True, label="x-hit"),
            Step([p["y"]], reset_prefix_cache=True, label="y-hit"),
        ],
        llm_kwargs={"kv_cache_memory_bytes": 24 << 20, "max_model_len": 2048,
                    "max_num_batched_tokens": 2048},
        env={"KVCORE_VERIFY_SAMPLE": "0"},
    )
    got = {s.label: s for s in result.steps}
    assert result.connector.get("vllm_preempted_requests_total", 0) >= 1
    for name in ("x", "y"):
        assert got[f"{name}-hit"].num_cached_tokens == [5 * CHUNK]
        assert got[f"{name}-hit"].outputs == reference[f"{name}-local"].outputs


def test_sampled_verification_of_real_kv(tiny_llama) -> None:
    """Every hit recomputed and compared (``KVCORE_VERIFY_SAMPLE=1``): vLLM's recompute on this
    CPU matches the stored KV within the default tolerance, so a clean run reports no
    mismatch (the injected faults are caught in test_correctness.py)."""
    prompts = [random_prompt(3 * CHUNK + 1, seed=100 + i) for i in range(6)]
    steps = [Step(prompts, label="store")]
    steps += [Step([q], reset_prefix_cache=True, label=f"verify-{i}")
              for i, q in enumerate(prompts)]
    result = run_engine(tiny_llama, steps, env={"KVCORE_VERIFY_SAMPLE": "1"})
    kv = result.kvcore["counters"]
    chunks = sum(kv.get("verify_chunks_total", {}).values())
    exact = sum(kv.get("verify_exact_total", {}).values())
    within = sum(kv.get("verify_within_tolerance_total", {}).values())
    mismatched = sum(kv.get("verify_mismatch_total", {}).values())
    print(f"verification on a real engine: {chunks} chunks compared, {exact} bit-identical, "
          f"{within} within tolerance, {mismatched} mismatched")
    assert chunks == 3 * len(prompts)
    assert mismatched == 0
    # Sampled requests were recomputed: vLLM reports no external hit for them.
    assert all(s.num_cached_tokens == [0] for s in result.steps[1:])
