"""Support for the tests: SGLang's real storage classes and host KV pools, on CPU.

SGLang is installed without its GPU dependencies (``pip install --no-deps sglang==0.5.23`` plus
the small pure-Python packages listed in docs/sglang.md). One test-side shim is needed:

- ``torchvision``: importing SGLang's host pools runs ``sglang.srt.mem_cache.memory_pool`` ->
  ``sglang.srt.configs`` -> ``configs/nano_nemotron_vl.py`` -> ``multimodal/internvl_utils.py``,
  which does ``import torchvision.transforms`` and
  ``from torchvision.transforms.functional import InterpolationMode`` at import time (for image
  preprocessing of one VLM, never used by the KV pools). torchvision cannot be installed here
  without replacing torch, so a stub with just ``InterpolationMode`` stands in *only while these
  modules import*, and is removed from ``sys.modules`` right after, so no other test (nor
  transformers' ``is_torchvision_available``) ever sees it.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from kvcore.config import Settings
from kvcore.engine import CacheEngine
from kvcore.eviction.lru import LRUPolicy
from kvcore.tiers.cpu import CpuTier

_STUBS = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


@contextmanager
def _torchvision_stub() -> Iterator[None]:
    import sglang  # noqa: F401  (imports transformers before the stub exists)

    if "torchvision" in sys.modules:  # a real one is installed and imported: nothing to do
        yield
        return
    try:
        importlib.import_module("torchvision")
        yield
        return
    except ImportError:
        pass

    class InterpolationMode:
        NEAREST = "nearest"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"

    for name in _STUBS:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.InterpolationMode = InterpolationMode  # type: ignore[attr-defined]
        sys.modules[name] = module
    try:
        yield
    finally:
        for name in _STUBS:
            sys.modules.pop(name, None)


def import_host_pools() -> Any:
    with _torchvision_stub():
        importlib.import_module("sglang.srt.mem_cache.memory_pool")
        mha = importlib.import_module("sglang.srt.mem_cache.pool_host.mha")
        importlib.import_module("sglang.srt.mem_cache.memory_pool_host")
        importlib.import_module("sglang.srt.mem_cache.pool_host.mla")
        importlib.import_module("sglang.srt.managers.cache_controller")
    return mha




LAYERS, HEADS, HEAD_DIM, PAGE = 2, 2, 16, 4


def make_mha_host_pool(layout: str, dtype: torch.dtype = torch.bfloat16,
                       device_tokens: int = 64) -> Any:
    """A real ``MHATokenToKVPoolHost`` on CPU over small per-layer K/V "device" buffers."""
    import_host_pools()
    from sglang.srt.mem_cache.device_pool_info import KVBufferLayout, KVBuffers, MHABufferInfo
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    k = tuple(torch.zeros(device_tokens, HEADS, HEAD_DIM, dtype=dtype) for _ in range(LAYERS))
    v = tuple(torch.zeros(device_tokens, HEADS, HEAD_DIM, dtype=dtype) for _ in range(LAYERS))
    ptrs = lambda ts: torch.tensor([t.data_ptr() for t in ts], dtype=torch.uint64)  # noqa: E731
    info = MHABufferInfo(
        buffers=KVBuffers(k=k, v=v, k_data_ptrs=ptrs(k), v_data_ptrs=ptrs(v),
                          layout=KVBufferLayout.NHD),
        page_size=PAGE, head_num=HEADS, head_dim=HEAD_DIM, v_head_dim=HEAD_DIM,
        dtype=dtype, device=torch.device("cpu"),
    )
    return MHATokenToKVPoolHost(
        info, 2.0, 0, PAGE, layout, pin_memory=False, device="cpu",
        device_capacity_tokens=device_tokens, start_layer=0, end_layer=LAYERS,
    )


def make_mla_host_pool(layout: str, dtype: torch.dtype = torch.bfloat16,
                       device_tokens: int = 64) -> Any:
    """A real ``MLATokenToKVPoolHost`` on CPU (one latent row per token and layer)."""
    import_host_pools()
    from sglang.srt.mem_cache.device_pool_info import MLABufferInfo
    from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

    rank, rope = 32, 16
    rows = tuple(torch.zeros(device_tokens, 1, rank + rope, dtype=dtype) for _ in range(LAYERS))
    info = MLABufferInfo(
        buffers=rows, data_ptrs=torch.tensor([r.data_ptr() for r in rows], dtype=torch.uint64),
        layer_indices=tuple(range(LAYERS)), device_layer_num=LAYERS, page_size=PAGE,
        kv_lora_rank=rank, qk_rope_head_dim=rope, kv_cache_dim=rank + rope, dtype=dtype,
        device=torch.device("cpu"),
    )
    return MLATokenToKVPoolHost(
        info, 2.0, 0, PAGE, layout, pin_memory=False, device="cpu",
        device_capacity_tokens=device_tokens, start_layer=0, end_layer=LAYERS,
        target_layer_num=LAYERS,
    )


def storage_config(extra: dict | None = None, tp_rank: int = 0, tp_size: int = 1,
                   model: str = "test/llama-tiny", page_first: bool = True,
                   mla: bool = False) -> Any:
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    return HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0,
        attn_cp_size=1, is_mla_model=mla, enable_storage_metrics=False,
        is_page_first_layout=page_first, model_name=model, extra_config=extra,
    )


DYNAMIC = {
    "backend_name": "kvcore",
    "module_path": "kvcore_sglang.backend",
    "class_name": "KVCoreHiCacheStorage",
    "interface_v1": 1,
}


def small_engine(*lower: Any, cpu_bytes: int = 16 * 1024**2) -> CacheEngine:
    settings = Settings(chunk_size=PAGE, cpu_size=cpu_bytes, tier_timeout_s=0.5)
    return CacheEngine(settings, tiers=[CpuTier(cpu_bytes, LRUPolicy()), *lower])


def fill_random(pool: Any, seed: int) -> None:
    """Random bytes over the whole host pool."""
    flat = pool.kv_buffer.reshape(-1).view(torch.uint8)
    gen = torch.Generator().manual_seed(seed)
    flat.copy_(torch.randint(0, 256, flat.shape, dtype=torch.uint8, generator=gen))


def page_bytes(pool: Any, index: int) -> bytes:
    """The bytes of the page starting at token ``index``, from SGLang's own accessor."""
    return pool.get_data_page(index, flat=True).contiguous().view(torch.uint8).numpy().tobytes()


def page_keys(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:04d}" for i in range(n)]
