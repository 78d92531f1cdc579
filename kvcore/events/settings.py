"""Settings of the KV event publisher: ``KVCORE_KV_EVENTS_*`` (or a ``kv_events:`` table in the
config file)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from kvcore.config import PluginSettings

SCHEMES = ("tcp://", "ipc://", "inproc://")


class KVEventSettings(PluginSettings):
    """Where kvcore publishes its tiers' KV events (vLLM's wire format) for cache-aware
    routers, and how much it remembers for them."""

    model_config = SettingsConfigDict(env_prefix="KVCORE_KV_EVENTS_")
    file_section: ClassVar[str] = "kv_events"

    endpoint: str = Field(
        "", description="ZMQ endpoint the publisher binds (PUB), for example "
        "`tcp://127.0.0.1:5557`; unset: no events (docs/kv-events.md)."
    )
    replay_endpoint: str = Field(
        "", description="ZMQ endpoint of the replay socket (ROUTER) a late subscriber asks for "
        "missed batches, as vLLM's publisher offers; unset: no replay."
    )
    topic: str = Field("", max_length=256, description="Topic frame of every message.")
    buffer_steps: int = Field(
        10000, gt=0, le=1_000_000, description="Batches kept for replay; a replay that asks for "
        "an older one gets a snapshot of every chunk held instead."
    )
    max_chunks: int = Field(
        65536, gt=0, description="Chunks whose published block hashes are remembered (to "
        "announce their removal); beyond, the oldest is announced removed and forgotten."
    )
    max_labels: int = Field(
        16384, gt=0, description="Chunks whose token ids and engine block hashes a connector "
        "told the publisher ahead of their store (about 1 KiB each for 256-token chunks)."
    )
    flush_s: float = Field(
        0.05, gt=0, le=10, description="Seconds between event batches published."
    )
    queue_size: int = Field(
        10000, gt=0, description="Tier notifications buffered for the publisher thread; beyond, "
        "they are dropped and counted (kv_events_dropped_total)."
    )

    @field_validator("endpoint", "replay_endpoint")
    @classmethod
    def _zmq_endpoint(cls, value: str) -> str:
        if value and not value.startswith(SCHEMES):
            raise ValueError(f"{value!r} is not a ZMQ endpoint: it must start with one of "
                             f"{', '.join(SCHEMES)}")
        return value
