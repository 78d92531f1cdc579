"""Drive KVCoreConnector through vLLM's real scheduler without a model.

Both connector roles run in this process and share one kvcore engine, as in a one-worker vLLM.
A fake forward writes each computed block with bytes derived from the tokens up to the end of
that block (as a real model's KV depends only on the prefix), so a test can check that every
block of a request holds exactly the bytes a recompute would give, loaded or not.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from vllm import SamplingParams
from vllm.config import (
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from kvcore_vllm.connector import KVCoreConnector
from kvcore_vllm.registration import register_with_vllm

EOS = 2
HEADS, HEAD = 2, 8
LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn",
          "model.layers.2.self_attn.attn"]
_ids = itertools.count(1)
init_none_hash(sha256)
register_with_vllm()


def _kvcore_of(connector: Any) -> KVCoreConnector:
    """The KVCoreConnector itself, or the one inside vLLM's MultiConnector."""
    if isinstance(connector, KVCoreConnector):
        return connector
    return next(c for c in connector._connectors if isinstance(c, KVCoreConnector))


def write_model_config(directory: Path) -> Path:
    """Only config.json: enough for vLLM's ModelConfig (no weights are loaded here)."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=HEADS,
                max_position_embeddings=8192).save_pretrained(directory)
    return directory


def make_vllm_config(model_dir: Path, block_size: int = 16, chunk_size: int = 32,
                     prefix_caching: bool = True, extra: dict[str, Any] | None = None,
                     max_batched: int = 2048, multi: bool = False) -> VllmConfig:
    """``multi``: kvcore as the child of vLLM's MultiConnector (as next to NixlConnector)."""
    # No request is sampled for verification unless a test asks (kvcore.verify_sample).
    kvcore_extra = {"kvcore.chunk_size": chunk_size, "kvcore.verify_sample": 0.0, **(extra or {})}
    if multi:
        transfer = KVTransferConfig(
            kv_connector="MultiConnector", kv_role="kv_both",
            kv_connector_extra_config={"connectors": [{
                "kv_connector": "KVCoreConnector", "kv_role": "kv_both",
                "kv_connector_extra_config": kvcore_extra}]})
    else:
        transfer = KVTransferConfig(kv_connector="KVCoreConnector", kv_role="kv_both",
                                    kv_connector_extra_config=kvcore_extra)
    model_config = ModelConfig(model=str(model_dir), dtype="bfloat16", seed=0,
                               skip_tokenizer_init=True)
    return VllmConfig(
        model_config=model_config,
        scheduler_config=SchedulerConfig(
            max_num_seqs=16, max_num_batched_tokens=max_batched, max_model_len=4096,
            enable_chunked_prefill=True, is_encoder_decoder=False),
        cache_config=CacheConfig(block_size=block_size, gpu_memory_utilization=0.9,
                                 cache_dtype="auto", enable_prefix_caching=prefix_caching),
        kv_transfer_config=transfer,
        device_config=DeviceConfig("cpu"),
    )


@dataclass
class Harness:
    """A real vLLM scheduler plus a worker-role connector over fake CPU-layout KV tensors."""

    config: VllmConfig
    num_blocks: int = 64
    worker_in_process: bool = True
    """False: the scheduler sees the worker only through its per-step metadata (as with vLLM's
    multiprocess executor); True: both share one engine (uniprocess executor)."""
    flush_stores: bool = True
    """Each step waits for kvcore's queued stores (deterministic tests)."""
    wait_async: bool = True
    """Each step waits for the background loads it started (deterministic tests); False lets
    them finish whenever they do, as in a real engine."""
    deferred_finalize: bool = False
    """Call the worker in the order of vLLM 0.33's Model Runner V2 with a speculator
    (``post_forward(defer_finalize=True)``, then ``finalize_step``): finished requests, load
    errors and worker metadata are taken before ``wait_for_save``."""
    scheduler: Scheduler = field(init=False)
    worker: KVCoreConnector = field(init=False)
    kv: dict[str, torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        bs = self.config.cache_config.block_size
        spec = FullAttentionSpec(block_size=bs, num_kv_heads=HEADS, head_size=HEAD,
                                 dtype=torch.bfloat16)
        kv_cache_config = KVCacheConfig(num_blocks=self.num_blocks, kv_cache_tensors=[],
                                        kv_cache_groups=[KVCacheGroupSpec(LAYERS, spec)])
        self.config.cache_config.num_gpu_blocks = self.num_blocks
        self.worker = KVConnectorFactory.create_connector(
            config=self.config, role=KVConnectorRole.WORKER, kv_cache_config=kv_cache_config)
        self.kv = {name: torch.zeros(self.num_blocks, HEADS, bs, 2 * HEAD, dtype=torch.bfloat16)
                   for name in LAYERS}
        self.worker.register_kv_caches(self.kv)
        self.scheduler = Scheduler(
            vllm_config=self.config, kv_cache_config=kv_cache_config, log_stats=True,
            structured_output_manager=StructuredOutputManager(self.config), block_size=bs)
        self.connector_scheduler.worker_in_process = self.worker_in_process
        self.sending_log: list[set[str]] = []
        self.recving_log: list[set[str]] = []
        self.forwarded: list[tuple[str, int, int, bool]] = []
        """(request, first token, tokens, context was correct) of every fake forward."""
        self.error_log: list[set[int]] = []

    @property
    def block_size(self) -> int:
        return self.config.cache_config.block_size

    @property
    def connector(self) -> KVCoreConnector:
        """The scheduler's connector (a KVCoreConnector, or vLLM's MultiConnector)."""
        return self.scheduler.connector  # type: ignore[return-value]

    @property
    def connector_scheduler(self) -> Any:
        """kvcore's scheduler side, inside a MultiConnector too."""
        return _kvcore_of(self.connector).scheduler

    @property
    def worker_side(self) -> Any:
        """kvcore's worker side, inside a MultiConnector too."""
        return _kvcore_of(self.worker).worker

    def request(self, tokens: list[int], max_tokens: int = 2, salt: str | None = None) -> Request:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        params.update_from_generation_config({}, EOS)
        req = Request(request_id=f"r{next(_ids)}", prompt_token_ids=list(tokens),
                      sampling_params=params, pooling_params=None, cache_salt=salt,
                      block_hasher=get_request_block_hasher(self.block_size, sha256))
        self.scheduler.add_request(req)
        return req

    # -- the fake model --------------------------------------------------------------------------

    def expected_block(self, tokens: list[int], index: int, layer: int) -> torch.Tensor:
        """What the model writes into block ``index`` of a sequence (depends on the prefix)."""
        end = (index + 1) * self.block_size
        seed = hashlib.sha256(np.asarray(tokens[:end] + [layer], "<u4").tobytes()).digest()
        rng = np.random.default_rng(int.from_bytes(seed[:8], "little"))
        shape = (HEADS, self.block_size, 2 * HEAD)
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(torch.bfloat16)

    def _forward(self, req_id: str, start: int, count: int) -> None:
        """Write the blocks computed this step. Like a real model, the result depends on the
        context: a block computed over a context block that does not hold what the model
        would have written there (a failed or wrong load) comes out wrong as well."""
        req = self.scheduler.requests[req_id]
        tokens = list(req.all_token_ids)
        block_ids = self.scheduler.kv_cache_manager.get_block_ids(req_id)[0]
        first, last = start // self.block_size, (start + count - 1) // self.block_size
        context_ok = all(self._block_ok(tokens, block_ids, b) for b in range(first))
        for b in range(first, last + 1):
            if (b + 1) * self.block_size > start + count:
                continue  # partial block: a real model writes only some rows; skip it
            for layer, name in enumerate(LAYERS):
                block = self.expected_block(tokens, b, layer)
                self.kv[name][block_ids[b]] = block if context_ok else block + 1
        self.forwarded.append((req_id, start, count, context_ok))

    def _block_ok(self, tokens: list[int], block_ids: list[int], b: int) -> bool:
        return all(torch.equal(self.kv[name][block_ids[b]], self.expected_block(tokens, b, layer))
                   for layer, name in enumerate(LAYERS))

    def blocks_match(self, req: Request, upto_tokens: int) -> bool:
        """Every complete block of ``req`` below ``upto_tokens`` holds the expected bytes."""
        tokens = list(req.all_token_ids)
        block_ids = self.scheduler.kv_cache_manager.get_block_ids(req.request_id)[0]
        return all(self._block_ok(tokens, block_ids, b)
                   for b in range(upto_tokens // self.block_size))

    def chunk_bytes(self, tokens: list[int], chunk: int) -> bytes:
        """The bytes kvcore must hold for chunk ``chunk`` of ``tokens`` (layer-major blocks)."""
        k = self.connector_scheduler.blocks_per_chunk
        parts = [self.expected_block(tokens, chunk * k + j, layer).view(torch.uint8).numpy()
                 .tobytes() for layer in range(len(LAYERS)) for j in range(k)]
        return b"".join(parts)

    def stored_chunks_correct(self, tokens: list[int]) -> list[bool | None]:
        """For each full chunk of ``tokens``: whether kvcore's copy is right (None: absent)."""
        side = self.connector_scheduler
        keys = side.engine.keys_for(side.namespace, tokens)
        out: list[bool | None] = []
        for i, key in enumerate(keys):
            views = side.engine.memory.acquire([key])
            if views[0] is None:
                out.append(None)
                continue
            try:
                out.append(bytes(views[0]) == self.chunk_bytes(tokens, i))
            finally:
                side.engine.memory.release(views)
        return out

    # -- one engine step -------------------------------------------------------------------------

    def step(self, before_load: Any = None) -> Any:
        out = self.scheduler.schedule()
        meta = out.kv_connector_metadata
        self.worker.bind_connector_metadata(meta)
        self.worker.handle_preemptions(meta)
        if before_load is not None:
            before_load(meta)
        self.worker.start_load_kv(None)  # type: ignore[arg-type]
        for name in LAYERS:  # what each attention layer does first
            self.worker.wait_for_layer_load(name)
        starts = {r.req_id: r.num_computed_tokens for r in out.scheduled_new_reqs}
        cached = out.scheduled_cached_reqs
        starts.update(dict(zip(cached.req_ids, cached.num_computed_tokens)))
        for req_id, count in out.num_scheduled_tokens.items():
            self._forward(req_id, starts[req_id], count)
        if self.deferred_finalize:
            if self.wait_async:
                self.worker_side.wait_for_async_loads(10.0)
            sending, recving = self.worker.get_finished(out.finished_req_ids)
            errors = self.worker.get_block_ids_with_load_errors()
            worker_meta = self.worker.build_connector_worker_meta()
            self.worker.wait_for_save()  # finalize_step, after the drafter
            self._settle()
        else:
            self.worker.wait_for_save()
            self._settle()
            sending, recving = self.worker.get_finished(out.finished_req_ids)
            errors = self.worker.get_block_ids_with_load_errors()
            worker_meta = self.worker.build_connector_worker_meta()
        self.worker.clear_connector_metadata()
        self.sending_log.append(set(sending or ()))
        self.recving_log.append(set(recving or ()))
        self.error_log.append(set(errors))
        req_ids = list(out.num_scheduled_tokens)
        output = ModelRunnerOutput(
            req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=[[1000 + i] for i in range(len(req_ids))], logprobs=None,
            prompt_logprobs_dict={}, pooler_output=None,
            kv_connector_output=KVConnectorOutput(finished_sending=sending,
                                                  finished_recving=recving,
                                                  invalid_block_ids=errors,
                                                  kv_connector_worker_meta=worker_meta))
        self.scheduler.update_from_output(out, output)
        return out

    def _settle(self) -> None:
        """Deterministic tests: stores, background loads and verifications land before the
        step's results are reported."""
        if self.flush_stores:
            self.worker_side.engine.flush(10.0)
        if self.wait_async:
            self.worker_side.wait_for_async_loads(10.0)
        self.worker_side.verifier.flush(10.0)
        if self.flush_stores:
            self.worker_side.engine.flush(10.0)

    def run_until_idle(self, limit: int = 50) -> None:
        for _ in range(limit):
            if not self.scheduler.has_requests():
                return
            self.step()
        raise AssertionError("scheduler did not become idle")

    def close(self) -> None:
        self.scheduler.shutdown()
        self.connector.shutdown()
        self.worker.shutdown()
