"""Settings of kvcore-nixl: ``KVCORE_NIXL_*`` environment variables (or ``nixl:`` in a file)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from kvcore.config import NameList, PluginSettings


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` -> (host, port); raises ValueError."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"expected host:port, not {address!r}")
    return host, int(port)


class NixlSettings(PluginSettings):
    """How this instance serves its CPU tier to peers and which peers it reads from."""

    model_config = SettingsConfigDict(env_prefix="KVCORE_NIXL_", extra="ignore", frozen=True)
    file_section: ClassVar[str] = "nixl"

    peers: NameList = Field(
        default_factory=list,
        description="Metadata addresses (host:port) of peers to read chunks from, in order.",
    )
    serve: bool = Field(
        False, description="Serve this process's CPU tier to peers (the prefill side)."
    )
    listen: str = Field(
        "127.0.0.1:5600", description="host:port of the metadata side channel when serving."
    )
    backend: str = Field("UCX", description="NIXL backend for transfers.")
    progress_thread: bool = Field(
        False, description="Run NIXL's own progress thread (it busy-polls a core); kvcore "
        "polls progress itself when this is off.",
    )
    timeout_s: float = Field(
        4.0, gt=0, description="Longest wait for one peer request or transfer."
    )
    connect_timeout_s: float = Field(
        0.5, gt=0, description="Longest wait to connect to a peer's side channel."
    )
    retry_s: float = Field(
        2.0, ge=0, description="After a peer fails, skip it for this many seconds."
    )
    store_wait_s: float = Field(
        1.0, ge=0, description="Server side: how long a lease waits for this instance's stores "
        "of the asked chunks still running (keep below the peers' KVCORE_NIXL_TIMEOUT_S).",
    )
    lease_timeout_s: float = Field(
        30.0, gt=0, description="Server side: release chunks a peer never confirmed after this."
    )
    @field_validator("peers")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            split_address(address)
        return value

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        split_address(value)
        return value
