"""Issue 15 on vLLM's real scheduler: a cache hit never changes what the model computes.

The harness's fake model computes a block wrongly when its context holds a wrong block, as a
real model would; ``stored_chunks_correct`` compares what kvcore holds with what a clean
recompute gives, so a chunk stored from KV computed over a failed load shows up as wrong.
"""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from kvcore.interfaces import TierUsage

BS, CHUNK = 16, 32


def prompt(chunks: int, seed: int, extra: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(3, 32000, chunks * CHUNK + extra).tolist()


def counter(h, name: str) -> float:
    return sum(h.worker_side.engine.metrics.snapshot()["counters"].get(name, {}).values())


def store_prompt(h, tokens: list[int]) -> None:
    h.request(tokens)
    h.run_until_idle()
    assert h.scheduler.reset_prefix_cache()  # vLLM forgets; kvcore keeps its copy


def lose_chunk_once(h, index: int):
    """A before_load hook: the promised chunk ``index`` vanishes (evicted, late, corrupt)."""
    def lose(meta) -> None:
        for part in getattr(meta, "metadata", (meta,)):  # inside MultiConnector too
            _lose(part)

    def _lose(meta) -> None:
        for load in getattr(meta, "loads", ()):
            if len(load.keys) > index - load.first_chunk >= 0:
                h.worker_side.engine.delete([load.keys[index - load.first_chunk]])
    return lose


@pytest.mark.parametrize("deferred_finalize", [False, True], ids=["v1-order", "deferred"])
def test_failed_load_stores_nothing_computed_over_it(harness_factory,
                                                     deferred_finalize: bool) -> None:
    """(1) One chunk of two fails to load; the same step computes two more chunks over the
    zeroed context. None of them may be stored; after vLLM's recompute all four are, right.
    Also in vLLM 0.33's deferred order, where the load errors are taken before the store."""
    h = harness_factory(deferred_finalize=deferred_finalize)
    head = prompt(2, seed=21, extra=0)
    store_prompt(h, head + [7])
    longer = head + prompt(2, seed=22, extra=1)
    req = h.request(longer)
    h.step(before_load=lose_chunk_once(h, 1))
    assert len(h.error_log[-1]) == 2  # chunk 1's blocks
    assert not h.forwarded[-1][3]  # this step's forward ran over the failed block
    assert counter(h, "vllm_stores_dropped_total") == 2  # chunks 2 and 3: computed over it
    h.step()  # vLLM recomputes from the failed block
    assert h.blocks_match(req, 4 * CHUNK)
    h.run_until_idle()
    assert h.stored_chunks_correct(longer) == [True, True, True, True]
    # A later request that extends the prompt loads all four chunks, every byte right.
    assert h.scheduler.reset_prefix_cache()
    later = h.request(longer[:4 * CHUNK] + prompt(1, seed=23))
    h.step()
    assert h.blocks_match(later, 4 * CHUNK)
    h.run_until_idle()


def test_request_sharing_a_failed_block_stores_nothing_from_that_step(harness_factory) -> None:
    """(1) Two requests of one step share the blocks of a load through vLLM's prefix cache; the
    load fails: neither stores what it computed over the failed block."""
    h = harness_factory()
    head = prompt(2, seed=24, extra=0)
    store_prompt(h, head + [7])
    a_tokens, b_tokens = head + prompt(1, seed=25), head + prompt(1, seed=26)
    a, b = h.request(a_tokens), h.request(b_tokens)
    h.step(before_load=lose_chunk_once(h, 1))
    assert h.error_log[-1]
    assert counter(h, "vllm_stores_dropped_total") >= 2
    h.step()
    assert h.blocks_match(a, 3 * CHUNK) and h.blocks_match(b, 3 * CHUNK)
    h.run_until_idle()
    assert h.stored_chunks_correct(a_tokens) == [True, True, True]
    assert h.stored_chunks_correct(b_tokens) == [True, True, True]


def test_multiconnector_keeps_the_recompute_policy(harness_factory) -> None:
    """(2) Inside vLLM's MultiConnector a failed kvcore load is recomputed, not an error."""
    from vllm.v1.request import RequestStatus

    h = harness_factory(multi=True)
    assert type(h.connector).__name__ == "MultiConnector"
    assert h.config.kv_transfer_config.kv_load_failure_policy == "recompute"
    assert h.scheduler.recompute_kv_load_failures
    tokens = prompt(3, seed=27)
    store_prompt(h, tokens)
    req = h.request(tokens)
    h.step(before_load=lose_chunk_once(h, 1))
    assert h.error_log[-1]
    assert req.status != RequestStatus.FINISHED_ERROR
    h.run_until_idle()
    assert req.status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert h.stored_chunks_correct(tokens) == [True, True, True]


def test_preempted_request_stores_its_chunks_after_resuming(harness_factory) -> None:
    """(3) Preemption cancels a request's pending stores; it stores them once it resumes."""
    h = harness_factory(num_blocks=20, flush_stores=False)
    side = h.worker_side
    real_store = side.engine.store

    def slow_store(keys, source):  # each store's copy takes a while: preemption finds it pending
        real_fill = source.fill

        def fill(indices, dests):
            time.sleep(0.2)
            real_fill(indices, dests)

        source.fill = fill
        return real_store(keys, source)

    side.engine.store = slow_store
    a, b = prompt(4, seed=10, extra=8), prompt(4, seed=11, extra=8)
    ra, rb = h.request(a, max_tokens=40), h.request(b, max_tokens=40)
    for _ in range(1000):
        if not h.scheduler.has_requests():
            break
        h.step()
        time.sleep(0.005)  # the delayed stores finish in real time
    assert not h.scheduler.has_requests()
    assert ra.num_preemptions + rb.num_preemptions > 0
    assert counter(h, "vllm_store_cancelled_total") > 0
    assert side.engine.flush(20.0)
    assert h.stored_chunks_correct(a) == [True] * 4
    assert h.stored_chunks_correct(b) == [True] * 4


def test_fail_policy_fails_the_request_and_stores_nothing_wrong(harness_factory) -> None:
    """(4) Under vLLM's ``fail`` policy the request ends with an error, its blocks are freed
    and nothing computed over the failed load reaches kvcore."""
    from vllm.v1.request import RequestStatus

    h = harness_factory(extra={"kvcore.vllm_load_failure_policy": "fail"})
    assert h.config.kv_transfer_config.kv_load_failure_policy == "fail"
    head = prompt(2, seed=28, extra=0)
    store_prompt(h, head + [7])
    longer = head + prompt(2, seed=29)
    req = h.request(longer)
    h.step(before_load=lose_chunk_once(h, 1))
    assert req.status == RequestStatus.FINISHED_ERROR
    h.run_until_idle()
    assert req.request_id not in h.scheduler.requests  # blocks freed
    assert h.stored_chunks_correct(longer) == [True, None, None, None]


def test_whole_chunk_prompt_under_a_local_hit(harness_factory) -> None:
    """(5) vLLM holds the first chunk itself: kvcore loads the rest but the last block."""
    h = harness_factory()
    tokens = prompt(3, seed=30, extra=0)
    store_prompt(h, tokens)
    h.request(tokens[:CHUNK] + prompt(1, seed=31))  # vLLM caches the first chunk again
    h.run_until_idle()
    again = h.request(tokens)
    h.step()
    assert again.num_computed_tokens == 3 * CHUNK
    assert h.blocks_match(again, 3 * CHUNK)
    h.run_until_idle()


class SlowMemoryTier:
    """A real lower tier (values in memory) whose reads take ``delay_s``."""

    framed = True
    name = "slow"

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.values: dict[bytes, bytes] = {}
        self.corrupt: set[bytes] = set()
        self.unreadable: set[bytes] = set()
        """Keys the tier claims to hold but never returns (a peer that times out)."""

    def contains(self, keys):
        return [k in self.values for k in keys]

    def get(self, keys):
        time.sleep(self.delay_s)
        out = []
        for k in keys:
            v = None if k in self.unreadable else self.values.get(k)
            if v is not None and k in self.corrupt:
                v = v[:-1] + bytes([v[-1] ^ 1])
            out.append(v)
        return out

    def put(self, items):
        for key, parts in items:
            self.values[key] = b"".join(bytes(p) for p in parts)
        return [True] * len(items)

    def delete(self, keys):
        return sum(self.values.pop(k, None) is not None for k in keys)

    def usage(self):
        return TierUsage(sum(map(len, self.values.values())), 1 << 40, len(self.values))

    def iter_keys(self):
        return iter(list(self.values))

    def pin(self, keys):
        return 0

    def unpin(self, keys):
        return 0

    def close(self):
        pass


def with_slow_tier(h, delay_s: float) -> SlowMemoryTier:
    """Put a slow lower tier under the harness's engine (write-behind fills it)."""
    from kvcore.interfaces import Tier

    engine = h.worker_side.engine
    tier = type("SlowTier", (SlowMemoryTier, Tier), {})(delay_s)
    engine.add_lower_tier(tier)
    return tier


def only_in_slow_tier(h, tokens: list[int]) -> None:
    engine = h.worker_side.engine
    assert engine.flush(10.0)
    engine.memory.delete(h.connector_scheduler.engine.keys_for(h.connector_scheduler.namespace,
                                                            tokens))


def test_load_from_a_lower_tier_is_asynchronous(harness_factory) -> None:
    """(6) Chunks outside the worker's memory load in the background: the request waits in
    WAITING_FOR_REMOTE_KVS while another request keeps decoding; then it runs, bytes right."""
    from vllm.v1.request import RequestStatus

    h = harness_factory(wait_async=False)
    with_slow_tier(h, delay_s=0.3)
    tokens = prompt(4, seed=32)
    store_prompt(h, tokens)
    only_in_slow_tier(h, tokens)
    decoding = h.request(prompt(1, seed=33), max_tokens=200)
    h.step()
    req = h.request(tokens)
    external, is_async = h.connector.get_num_new_matched_tokens(req, 0)
    assert (external, is_async) == (4 * CHUNK, True)
    steps_while_loading = 0
    out = h.step()
    assert req.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    assert req.request_id not in out.num_scheduled_tokens
    while req.request_id not in set().union(*h.recving_log) and steps_while_loading < 200:
        out = h.step()
        assert decoding.request_id in out.num_scheduled_tokens  # the batch kept running
        steps_while_loading += 1
        time.sleep(0.01)
    assert steps_while_loading >= 1
    h.step()
    assert req.num_computed_tokens >= 4 * CHUNK
    assert h.blocks_match(req, 4 * CHUNK)
    assert not any(h.error_log)
    assert counter(h, "vllm_async_loads_total") == 1


def load_broken_prompt(h, seed: int, steps: int, broken: str, chunk: int):
    """A 4-chunk prompt held only in a slow tier whose chunk ``chunk`` is ``broken`` (a set of
    SlowMemoryTier): request it and step until vLLM holds all 4 chunks."""
    tier = with_slow_tier(h, delay_s=0.0)
    tokens = prompt(4, seed=seed)
    store_prompt(h, tokens)
    only_in_slow_tier(h, tokens)
    keys = h.connector_scheduler.engine.keys_for(h.connector_scheduler.namespace, tokens)
    getattr(tier, broken).add(keys[chunk])
    req = h.request(tokens)
    for _ in range(steps):
        h.step()
        if req.num_computed_tokens >= 4 * CHUNK:
            break
    assert h.blocks_match(req, 4 * CHUNK)
    return tokens


def test_failed_asynchronous_load_is_recomputed(harness_factory) -> None:
    """(6) A corrupt chunk in an asynchronous load: reported with the request, recomputed."""
    h = harness_factory()
    tokens = load_broken_prompt(h, seed=34, steps=10, broken="corrupt", chunk=2)
    assert any(len(e) == 4 for e in h.error_log)  # chunks 2 and 3, two blocks each
    h.run_until_idle()
    assert h.stored_chunks_correct(tokens) == [True] * 4  # chunk 2 stored again, right


def test_a_chunk_that_never_loads_is_not_retried_for_ever(harness_factory) -> None:
    """(6) A tier that claims a chunk but never returns it: the failed asynchronous load
    sends the request back to the waiting queue, and its next lookup must not claim that
    chunk again (else it would wait for it for ever)."""
    h = harness_factory()
    load_broken_prompt(h, seed=36, steps=20, broken="unreadable", chunk=0)
    assert counter(h, "vllm_async_loads_total") == 3  # LOAD_RETRIES, then recomputed
    h.run_until_idle()


def test_memory_hits_stay_synchronous(harness_factory) -> None:
    h = harness_factory()
    with_slow_tier(h, delay_s=0.0)
    tokens = prompt(2, seed=35)
    store_prompt(h, tokens)
    req = h.request(tokens)
    assert h.connector.get_num_new_matched_tokens(req, 0) == (2 * CHUNK, False)
    h.run_until_idle()


# -- verified hits --------------------------------------------------------------------------


def verifying(harness_factory, **kw):
    return harness_factory(extra={"kvcore.verify_sample": 1.0}, **kw)


def run_sampled(h, tokens: list[int]):
    req = h.request(tokens)
    assert h.connector.get_num_new_matched_tokens(req, 0) == (0, False)  # recomputed instead
    h.run_until_idle()
    return req


def test_clean_verification_finds_nothing(harness_factory) -> None:
    h = verifying(harness_factory)
    for seed in range(5):
        tokens = prompt(3, seed=40 + seed)
        h.connector_scheduler.verify_sample = 0.0
        store_prompt(h, tokens)
        h.connector_scheduler.verify_sample = 1.0
        run_sampled(h, tokens)
    assert counter(h, "verify_chunks_total") == 15
    assert counter(h, "verify_exact_total") == 15
    assert counter(h, "verify_mismatch_total") == 0


def _fault(name: str, h, tokens: list[int]) -> None:
    """Replace chunk 1 of ``tokens`` in kvcore by the bytes a real fault would leave."""
    side = h.connector_scheduler
    keys = side.engine.keys_for(side.namespace, tokens)
    good = h.chunk_bytes(tokens, 1)
    layer = len(good) // 3
    block = layer // side.blocks_per_chunk
    if name == "shifted-by-a-block":
        bad = h.chunk_bytes(tokens, 1)[block:] + h.chunk_bytes(tokens, 2)[:block]
    elif name == "layers-swapped":
        bad = good[layer:2 * layer] + good[:layer] + good[2 * layer:]
    elif name == "other-namespace":
        bad = h.chunk_bytes(prompt(3, seed=99), 1)  # same position, other content
    elif name == "zeroed-context":  # what the model computes for chunk 1 over a zeroed chunk 0
        import torch

        k = side.blocks_per_chunk
        bad = b"".join((h.expected_block(tokens, k + j, layer_i) + 1).view(torch.uint8).numpy()
                       .tobytes() for layer_i in range(3) for j in range(k))
    elif name == "flipped-bits":
        arr = bytearray(good)
        rng = random.Random(5)
        for _ in range(3):
            arr[rng.randrange(len(arr)) | 1] ^= 0x40  # a high bit of a bf16 element
        bad = bytes(arr)
    else:
        raise ValueError(name)
    assert bad != good and len(bad) == len(good)
    side.engine.delete([keys[1]])
    side.engine.store_buffers([keys[1]], [bad]).wait()


def test_each_injected_fault_is_caught_and_replaced(harness_factory) -> None:
    faults = ["shifted-by-a-block", "layers-swapped", "other-namespace", "zeroed-context",
              "flipped-bits"]
    h = verifying(harness_factory)
    for i, fault in enumerate(faults):
        tokens = prompt(3, seed=50 + i)
        h.connector_scheduler.verify_sample = 0.0
        store_prompt(h, tokens)
        _fault(fault, h, tokens)
        assert h.stored_chunks_correct(tokens) == [True, False, True]
        before = counter(h, "verify_mismatch_total")
        h.connector_scheduler.verify_sample = 1.0
        run_sampled(h, tokens)
        assert counter(h, "verify_mismatch_total") == before + 1, fault
        h.worker_side.engine.flush(10.0)
        assert h.stored_chunks_correct(tokens) == [True, True, True], fault
