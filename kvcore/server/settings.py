"""Settings of ``kvcore server`` and of the engines attached to it: ``KVCORE_SERVER_*``."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from kvcore.config import PluginSettings


def zmq_address(url: str) -> str:
    """``unix:///run/kvcore/kvcore.sock`` (or ``ipc://...``) as a ZMQ address."""
    if url.startswith("unix://"):
        return "ipc://" + url.removeprefix("unix://")
    if url.startswith("ipc://"):
        return url
    raise ValueError("give unix:///path/to/kvcore.sock (the server shares memory with its "
                     "engines, so it listens on a local socket only)")


class ServerSettings(PluginSettings):
    """One cache per host, shared by the engines on it (docs/server.md)."""

    model_config = SettingsConfigDict(env_prefix="KVCORE_SERVER_")
    file_section: ClassVar[str] = "server"

    url: str = Field(
        "", description="Where the server listens (unix:///run/kvcore/kvcore.sock); an engine "
        "with this set keeps its memory tier in the server instead of in process.")
    lease_s: float = Field(
        10.0, gt=0, le=3600,
        description="A client silent this long (crashed) loses its reservations and holds: "
        "nothing it half wrote becomes visible, nothing it read stays pinned.")
    timeout_s: float = Field(
        2.0, gt=0, le=600,
        description="Longest wait of an engine for one answer of the server; past it the "
        "engine treats the server as down (misses) and reconnects by itself.")
    retry_s: float = Field(
        1.0, gt=0, le=600, description="Wait between an engine's reconnection attempts.")
    group: str = Field(
        "", description="A group that may use the server too (socket and shared memory 0660); "
        "empty: the server's user only (0600).")
    shm_dir: str = Field(
        "/dev/shm", description="Where the server creates its shared-memory file.")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value:
            zmq_address(value)  # a clear error for a URL that is not a local socket
        return value
