"""The kvcore namespace of a vLLM engine: what makes its KV bytes incompatible or private.

Both connector roles derive it from the same configs, so the scheduler looks up exactly the keys
the worker stores. vLLM's per-request ``cache_salt`` becomes the tenant.
"""

from __future__ import annotations

from typing import Any

from kvcore.config import ConfigError
from kvcore.keys import Namespace


def kv_geometry(kv_cache_config: Any) -> tuple[list[str], Any]:
    """Layer names (in kvcore's chunk order) and the KV spec of the single attention group."""
    groups = list(kv_cache_config.kv_cache_groups)
    if len(groups) != 1:
        raise ConfigError(
            f"kvcore-vllm supports models with one KV cache group (full attention); this model "
            f"has {len(groups)} (hybrid or sliding-window). Run vLLM without the kvcore connector.")
    return list(groups[0].layer_names), groups[0].kv_cache_spec


def check_chunk_size(chunk_size: int, block_size: int) -> int:
    """Blocks per chunk; a clear error when the chunk size is not a multiple of the block size."""
    if chunk_size % block_size:
        raise ConfigError(
            f"KVCORE_CHUNK_SIZE={chunk_size}: must be a multiple of vLLM's KV block size "
            f"({block_size}); for example "
            f"KVCORE_CHUNK_SIZE={block_size * max(1, chunk_size // block_size)}"
            f" or set vLLM's --block-size to a divisor of {chunk_size}")
    return chunk_size // block_size


def layout_name(vllm_config: Any) -> str:
    """Which of vLLM's KV layouts the workers use: ``vllm-cpu`` or ``vllm-gpu-<layout>``."""
    device = str(getattr(vllm_config.device_config, "device_type", "") or "")
    if device == "cpu":
        return "vllm-cpu"
    layout = getattr(vllm_config.cache_config, "kv_cache_layout", None) or "NHD"
    return f"vllm-{device or 'gpu'}-{layout}"


def engine_namespace(vllm_config: Any, kv_cache_config: Any, rank: int = 0) -> Namespace:
    """The shared-tenant namespace of this engine for tensor/pipeline ``rank``."""
    model_config = vllm_config.model_config
    parallel = vllm_config.parallel_config
    layers, spec = kv_geometry(kv_cache_config)
    model = f"{model_config.model}@{model_config.revision or ''}"
    geometry = (f"layers={len(layers)};kv_heads={spec.num_kv_heads};head={spec.head_size};"
                f"block={spec.block_size};page={spec.page_size_bytes}")
    world = int(parallel.tensor_parallel_size) * int(parallel.pipeline_parallel_size)
    return Namespace(model=model, dtype=str(spec.dtype).removeprefix("torch."),
                     layout=layout_name(vllm_config), geometry=geometry, rank=rank,
                     world_size=world)


def served_names(vllm_config: Any) -> list[str]:
    """The names clients ask this engine's model by: vLLM's served model name (the model path
    unless ``--served-model-name`` is given), then the model path."""
    model_config = vllm_config.model_config
    names = getattr(model_config, "served_model_name", None) or []
    if isinstance(names, str):
        names = [names]
    return [*map(str, names), str(model_config.model)]
