"""Settings of kvcore-nixl: ``KVCORE_NIXL_*`` environment variables (or ``nixl:`` in a file)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from kvcore.config import ByteSize, NameList, PluginSettings


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` -> (host, port); raises ValueError."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"expected host:port, not {address!r}")
    return host, int(port)


class NixlSettings(PluginSettings):
    """How this instance serves its CPU tier to peers and which peers it reads from."""

    model_config = SettingsConfigDict(env_prefix="KVCORE_NIXL_")
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
    secret: SecretStr = Field(
        SecretStr(""),
        description="Shared secret of one deployment (the same on every instance): a peer "
        "proves it holds it (HMAC-SHA256 challenge-response, the secret never crosses the "
        "wire) before it may lease or read; a peer that cannot prove it is refused both ways. "
        "Required to serve beyond loopback.",
    )
    allow_unauthenticated: bool = Field(
        False, description="Serve beyond loopback without KVCORE_NIXL_SECRET (a network you "
        "trust); on loopback an unauthenticated server only warns.",
    )
    max_connections: int = Field(
        64, gt=0, description="Server side: side-channel connections served at once (one "
        "thread each); beyond, new ones are closed.",
    )
    idle_timeout_s: float = Field(
        60.0, gt=0, description="Server side: close a side-channel connection idle this long "
        "(clients reconnect by themselves).",
    )
    frame_timeout_s: float = Field(
        5.0, gt=0, description="Server side: a request (and the handshake) must arrive whole "
        "within this long once it started.",
    )
    max_frame_bytes: ByteSize = Field(
        1 << 20, ge=4096, description="Server side: largest request body (24 bytes per chunk "
        "key); a larger frame closes the connection.",
    )
    max_leases_per_peer: int = Field(
        16, gt=0, description="Server side: leases one connection may hold at once.",
    )
    max_lease_fraction: float = Field(
        0.5, gt=0, le=0.75, description="Server side: share of the CPU tier's budget one "
        "connection's leases may hold (all connections together: 75%), so the owner can always "
        "store; a lease over it gets the leading chunks that fit.",
    )

    def limits(self):  # type: ignore[no-untyped-def]
        """The server's :class:`~kvcore_nixl.server.Limits` from these settings."""
        from kvcore_nixl.server import Limits

        return Limits(self.max_connections, self.idle_timeout_s, self.frame_timeout_s,
                      self.max_frame_bytes, self.max_leases_per_peer, self.max_lease_fraction,
                      self.allow_unauthenticated)

    def secret_bytes(self) -> bytes | None:
        value = self.secret.get_secret_value()
        return value.encode() if value else None

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
