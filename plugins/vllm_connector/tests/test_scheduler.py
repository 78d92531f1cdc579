"""Scheduler-side behaviour through vLLM's real scheduler (no model): hits, partial hits,
tenants, load failures, delayed block freeing, preemption, prefix caching off."""

from __future__ import annotations

import numpy as np
import pytest

from kvcore.config import ConfigError

BS, CHUNK = 16, 32


def prompt(chunks: int, seed: int, extra: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(3, 32000, chunks * CHUNK + extra).tolist()


def counter(h, name: str) -> float:
    return h.worker.counters().get(name, 0.0)


@pytest.mark.parametrize("deferred_finalize", [False, True], ids=["v1-order", "deferred"])
def test_store_then_load_is_byte_identical(harness_factory, deferred_finalize: bool) -> None:
    """Also in vLLM 0.33's deferred order (Model Runner V2 with a speculator)."""
    h = harness_factory(deferred_finalize=deferred_finalize)
    tokens = prompt(4, seed=1)
    first = h.request(tokens)
    h.run_until_idle()
    # The blocks stayed allocated until the background store finished, then were reported.
    assert any(first.request_id in sent for sent in h.sending_log)
    assert h.scheduler.reset_prefix_cache()  # vLLM forgets; kvcore keeps its copy

    again = h.request(tokens)
    h.step()
    assert again.num_computed_tokens == len(tokens)
    assert counter(h, "vllm_loaded_tokens_total") == 4 * CHUNK
    assert h.blocks_match(again, 4 * CHUNK)
    assert not any(h.error_log)
    h.run_until_idle()


def test_layerwise_load_is_byte_identical(harness_factory) -> None:
    h = harness_factory(extra={"kvcore.vllm_layerwise": True})
    assert h.worker.worker.layerwise
    tokens = prompt(4, seed=12)
    h.request(tokens)
    h.run_until_idle()
    assert h.scheduler.reset_prefix_cache()
    h.request(tokens[:3 * BS] + prompt(1, seed=98))  # vLLM keeps 3 blocks: a partial chunk
    h.run_until_idle()
    again = h.request(tokens)
    h.step()
    assert h.blocks_match(again, 4 * CHUNK)
    assert not any(h.error_log)
    h.run_until_idle()


def test_prefix_cache_hit_is_not_counted_again(harness_factory) -> None:
    h = harness_factory()
    tokens = prompt(3, seed=2)
    h.request(tokens)
    h.run_until_idle()
    again = h.request(tokens)  # vLLM's own prefix cache holds every block
    external, _ = h.connector.get_num_new_matched_tokens(again, 3 * CHUNK)
    assert external == 0
    h.run_until_idle()
    assert counter(h, "vllm_loaded_tokens_total") == 0


def test_partial_local_hit_loads_only_the_rest(harness_factory) -> None:
    h = harness_factory()
    tokens = prompt(4, seed=3)
    h.request(tokens)
    h.run_until_idle()
    assert h.scheduler.reset_prefix_cache()
    # Put 3 blocks (1.5 chunks) of the prompt into vLLM's prefix cache, then diverge.
    other = tokens[:3 * BS] + prompt(1, seed=99)
    h.request(other)
    h.run_until_idle()
    loaded_before = counter(h, "vllm_loaded_tokens_total")

    again = h.request(tokens)
    external, _ = h.connector.get_num_new_matched_tokens(again, 3 * BS)
    assert external == 4 * CHUNK - 3 * BS
    h.step()
    assert counter(h, "vllm_loaded_tokens_total") - loaded_before == 4 * CHUNK - 3 * BS
    assert h.blocks_match(again, 4 * CHUNK)
    assert not any(h.error_log)
    h.run_until_idle()


def test_prompt_of_whole_chunks_recomputes_one_block(harness_factory) -> None:
    """Issue 15 (5): a prompt of exactly 3 chunks loads all but its last block (as vLLM's own
    prefix cache does), not all but its last chunk."""
    h = harness_factory()
    tokens = prompt(3, seed=4, extra=0)
    h.request(tokens)
    h.run_until_idle()
    assert h.scheduler.reset_prefix_cache()
    again = h.request(tokens)
    external, is_async = h.connector.get_num_new_matched_tokens(again, 0)
    assert (external, is_async) == (3 * CHUNK - BS, False)
    h.step()
    assert again.num_computed_tokens == 3 * CHUNK  # the last block computed this step
    assert counter(h, "vllm_loaded_tokens_total") == 3 * CHUNK - BS
    assert h.blocks_match(again, 3 * CHUNK)
    assert not any(h.error_log)
    h.run_until_idle()


def test_tenants_never_share(harness_factory) -> None:
    h = harness_factory()
    tokens = prompt(3, seed=5)
    h.request(tokens, salt="tenant-a")
    h.run_until_idle()
    assert h.scheduler.reset_prefix_cache()
    other = h.request(tokens, salt="tenant-b")
    same = h.request(tokens, salt="tenant-a")
    plain = h.request(tokens)
    assert h.connector.get_num_new_matched_tokens(other, 0)[0] == 0
    assert h.connector.get_num_new_matched_tokens(plain, 0)[0] == 0
    assert h.connector.get_num_new_matched_tokens(same, 0)[0] == 3 * CHUNK
    h.run_until_idle()


def test_each_request_is_recorded_with_why_it_missed(harness_factory) -> None:
    """The scheduler side records every lookup by vLLM's request id (docs/misses.md)."""
    h = harness_factory()
    tokens = prompt(3, seed=15)
    cold = h.request(tokens, salt="tenant-a")
    h.run_until_idle()
    assert h.scheduler.reset_prefix_cache()
    hit = h.request(tokens, salt="tenant-a")
    other = h.request(tokens)
    short = h.request(tokens[: CHUNK - 2])
    h.run_until_idle()
    requests = h.worker.engine.requests
    first = requests.get(cold.request_id).as_dict()
    assert first["miss"] == {"reason": "never_stored", "chunk": 0}
    assert first["tokens_prompt"] == 3 * CHUNK + 1
    again = requests.get(hit.request_id).as_dict()
    assert again["miss"] is None and again["hit_by_tier"] == {"cpu": 3 * CHUNK}
    assert again["load"]["chunks_loaded"] == again["load"]["chunks_asked"] == 3
    foreign = requests.get(other.request_id).as_dict()["miss"]
    assert foreign["reason"] == "other_namespace"
    assert foreign["differs"] == {"tenant": {"asked": "", "held": "tenant-a"}}
    assert requests.get(short.request_id).as_dict()["miss"]["reason"] == "partial_chunk"


def test_chunk_lost_after_promise_is_recomputed(harness_factory) -> None:
    h = harness_factory()
    tokens = prompt(4, seed=6)
    h.request(tokens)
    h.run_until_idle()
    assert h.scheduler.reset_prefix_cache()
    # kvcore's lookup promised 4 chunks; chunks 2 and 3 vanish before the worker loads them.
    assert h.config.kv_transfer_config.kv_load_failure_policy == "recompute"
    again = h.request(tokens)

    def lose(meta) -> None:
        (load,) = meta.loads
        h.worker.engine.delete(load.keys[2:])

    h.step(before_load=lose)
    failed = h.error_log[-1]
    assert len(failed) == 4  # blocks of chunks 2 and 3
    assert again.num_computed_tokens == 2 * CHUNK  # vLLM rewound to the last good block
    h.step()  # recompute
    assert h.blocks_match(again, 4 * CHUNK)
    assert counter(h, "vllm_load_error_blocks_total") == 4
    record = h.worker.engine.requests.get(again.request_id)
    assert record.miss is None and record.load["chunks_loaded"] == 2  # found 4, loaded 2
    assert record.load["miss"]["reason"] == "load_failed"
    assert record.load["miss"]["chunk"] == 2
    assert record.load["miss"]["cause"] == "deleted from cpu after the lookup"
    h.run_until_idle()


def test_lookup_failure_is_a_miss(harness_factory, monkeypatch) -> None:
    h = harness_factory()
    tokens = prompt(2, seed=7)

    def broken(*args, **kwargs):
        raise OSError("tier gone")

    monkeypatch.setattr(h.connector.engine, "lookup", broken)
    req = h.request(tokens)
    assert h.connector.get_num_new_matched_tokens(req, 0) == (0, False)
    h.step()
    assert h.blocks_match(req, 2 * CHUNK)
    h.run_until_idle()


def test_store_failure_still_frees_blocks(harness_factory, monkeypatch) -> None:
    h = harness_factory()

    def broken(*args, **kwargs):
        raise RuntimeError("no room")

    monkeypatch.setattr(h.worker.engine, "store", broken)
    req = h.request(prompt(2, seed=8))
    h.run_until_idle()
    assert req.request_id not in h.scheduler.requests


def test_prefix_caching_off(harness_factory) -> None:
    h = harness_factory(prefix_caching=False)
    tokens = prompt(3, seed=9)
    h.request(tokens)
    h.run_until_idle()
    again = h.request(tokens)
    h.step()
    assert again.num_computed_tokens == len(tokens)
    assert h.blocks_match(again, 3 * CHUNK)
    h.run_until_idle()


def test_preempted_request_resumes_with_correct_kv(harness_factory) -> None:
    # 20 blocks: two 9-block prompts that then grow cannot both stay; vLLM preempts one.
    h = harness_factory(num_blocks=20)
    a, b = prompt(4, seed=10, extra=8), prompt(4, seed=11, extra=8)
    ra = h.request(a, max_tokens=40)
    rb = h.request(b, max_tokens=40)
    h.run_until_idle(limit=200)
    assert ra.num_preemptions + rb.num_preemptions > 0
    assert counter(h, "vllm_worker_errors_total") == 0


def test_chunk_size_must_be_a_multiple_of_block_size(model_config_dir) -> None:
    from harness import Harness, make_vllm_config

    with pytest.raises(ConfigError, match=r"KVCORE_CHUNK_SIZE=40.*block size \(16\)"):
        Harness(make_vllm_config(model_config_dir, chunk_size=40))


def test_each_rank_stores_under_its_own_namespace(harness_factory) -> None:
    from dataclasses import replace

    from kvcore.keys import NAMESPACE_BYTES

    h = harness_factory()
    side = h.worker.worker
    side.namespace = replace(side.namespace, rank=1, world_size=2)
    side._digests.clear()
    tokens = prompt(2, seed=13)
    h.request(tokens, salt="t")
    h.run_until_idle()
    stored = list(h.worker.engine.memory.iter_keys())
    assert stored and {k[:NAMESPACE_BYTES] for k in stored} == {
        side.namespace.with_tenant("t").digest}
    assert h.scheduler.reset_prefix_cache()
    again = h.request(tokens, salt="t")
    # The scheduler looks up rank 0's keys: rank 1's shard alone is no hit.
    assert h.connector.get_num_new_matched_tokens(again, 0)[0] == 0
    h.run_until_idle()


def test_worker_in_another_process_is_mirrored(harness_factory) -> None:
    """vLLM's multiprocess executor: the scheduler sees the worker's CPU tier only through the
    admissions and evictions the worker sends back each step."""
    h = harness_factory(worker_in_process=False)
    tokens = prompt(4, seed=14)
    h.request(tokens)
    h.run_until_idle()
    assert len(h.connector.scheduler.worker_chunks) == 4
    assert h.scheduler.reset_prefix_cache()
    again = h.request(tokens)
    assert h.connector.get_num_new_matched_tokens(again, 0)[0] == 4 * CHUNK
    h.step()
    assert h.blocks_match(again, 4 * CHUNK)
    h.run_until_idle()
    # The worker loses the chunks: the next step tells the scheduler, whose lookup then misses.
    stored = set(h.worker.engine.memory.iter_keys())
    assert stored == h.connector.scheduler.worker_chunks
    h.worker.engine.delete(list(stored))
    h.request(prompt(1, seed=15))
    h.step()
    assert not stored & h.connector.scheduler.worker_chunks
    h.run_until_idle()
    assert h.scheduler.reset_prefix_cache()
    last = h.request(tokens)
    assert h.connector.get_num_new_matched_tokens(last, 0)[0] == 0
    h.run_until_idle()


def test_planning_failure_after_promise_is_recomputed(harness_factory, monkeypatch) -> None:
    h = harness_factory()
    tokens = prompt(3, seed=16)
    h.request(tokens)
    h.run_until_idle()
    assert h.scheduler.reset_prefix_cache()
    side = h.connector.scheduler
    real_plan = side._load_spec

    def broken_plan(tracked, req_id, promised):
        raise RuntimeError("planning bug")

    monkeypatch.setattr(side, "_load_spec", broken_plan)
    again = h.request(tokens)
    h.step()
    assert len(h.error_log[-1]) == 6  # all 3 promised chunks (6 blocks) reported failed
    assert again.num_computed_tokens == 0
    monkeypatch.setattr(side, "_load_spec", real_plan)
    h.step()
    assert h.blocks_match(again, 3 * CHUNK)
    h.run_until_idle()


def test_chunk_of_foreign_size_is_never_copied(harness_factory) -> None:
    h = harness_factory()
    tokens = prompt(3, seed=17)
    h.request(tokens)
    h.run_until_idle()
    assert h.scheduler.reset_prefix_cache()
    again = h.request(tokens)

    def replace_middle(meta) -> None:
        (load,) = meta.loads
        engine = h.worker.engine
        engine.delete([load.keys[1]])
        engine.store_buffers([load.keys[1]], [bytes(100)]).wait()

    h.step(before_load=replace_middle)
    assert len(h.error_log[-1]) == 4  # chunks 1 and 2 (two blocks each)
    assert again.num_computed_tokens == CHUNK
    h.step()
    assert h.blocks_match(again, 3 * CHUNK)
    h.run_until_idle()
