"""Settings of the vLLM connector: ``KVCORE_VLLM_*`` environment variables.

Core settings (``KVCORE_CHUNK_SIZE``, ``KVCORE_TIERS``, ``KVCORE_CPU_SIZE``, ...) apply as well.
Each may also be given in ``kv_connector_extra_config`` as ``"kvcore.<name>"`` (for example
``{"kvcore.chunk_size": 512, "kvcore.vllm_layerwise": true}``); the environment is the default.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from kvcore.config import PluginSettings


class VllmSettings(PluginSettings):
    """Options of kvcore-vllm."""

    model_config = SettingsConfigDict(env_prefix="KVCORE_VLLM_")
    file_section: ClassVar[str] = "vllm"

    layerwise: bool = Field(
        False, description="Load layer by layer in a background thread, overlapping compute.")
    load_timeout_s: float = Field(
        10.0, gt=0, description="Longest wait for chunks at load time; later ones are recomputed.")
    store_timeout_s: float = Field(
        30.0, gt=0,
        description="Longest time a finished request's blocks wait for its background store.")
    async_loads: bool = Field(
        True,
        description="Load chunks that are not in the worker's memory tier (disk, Redis, a "
                    "peer) in the background while the batch runs; the request waits in "
                    "vLLM's WAITING_FOR_REMOTE_KVS. False loads them within the step.")
    stats_interval_s: float = Field(
        1.0, ge=0,
        description="How often the worker hands its kvcore counters to vLLM's /metrics (at "
                    "most; with vLLM's stats logging on).")
    load_failure_policy: Literal["recompute", "fail"] = Field(
        "recompute",
        description="What vLLM does with a request whose promised KV failed to load "
                    "(sets vLLM's kv_load_failure_policy; recompute keeps outputs correct).")
