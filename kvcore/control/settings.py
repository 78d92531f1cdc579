"""Settings of the control plane: ``KVCORE_CONTROLLER_*`` (or a ``controller:`` table in the
config file). Instances and the controller read the same class."""

from __future__ import annotations

from typing import ClassVar
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from kvcore.config import ByteSize, PluginSettings


class ControllerSettings(PluginSettings):
    """Where instances report, how the controller listens, and the limits of both."""

    model_config = SettingsConfigDict(env_prefix="KVCORE_CONTROLLER_")
    file_section: ClassVar[str] = "controller"

    url: str = Field(
        "", description="Controller URL; when set, instances report there (http://host:port)."
    )
    token: SecretStr = Field(
        SecretStr(""), description="Bearer token for every mutating request (required)."
    )
    host: str = Field("127.0.0.1", description="Address `kvcore controller` binds to.")
    port: int = Field(8470, ge=0, le=65535, description="Port of `kvcore controller`.")
    instance_id: str = Field(
        "", max_length=128, description="Id this instance registers under (default: host-pid)."
    )
    instance_name: str = Field("", max_length=128, description="Human-readable instance name.")
    heartbeat_s: float = Field(2.0, gt=0, description="Seconds between instance heartbeats.")
    expiry_s: float = Field(
        10.0, gt=0, description="An instance silent this long is dropped from the index."
    )
    flush_s: float = Field(0.2, gt=0, description="Seconds between event batches sent.")
    timeout_s: float = Field(2.0, gt=0, description="Timeout of one instance->controller call.")
    poll_s: float = Field(
        10.0, gt=0, le=60,
        description="Longest wait of one command long-poll (instance and controller).",
    )
    command_timeout_s: float = Field(
        10.0, gt=0, description="Longest wait of the controller for an instance to run a command."
    )
    queue_size: int = Field(
        10000, gt=0, description="Event batches an instance buffers before dropping (and resync)."
    )
    batch_keys: int = Field(4096, gt=0, description="Most chunk keys in one event post.")
    max_tokens: int = Field(262144, gt=0, description="Most token ids in one request.")
    max_body_bytes: ByteSize = Field(
        4 * 1024**2, description="Largest request body of the public endpoints."
    )
    max_transfer_bytes: ByteSize = Field(
        64 * 1024**2, description="Largest move between instances (chunk bytes relayed by the "
        "controller) and largest instance result body."
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="A connection that has not sent a request's headers this long "
        "after it opened (or after its last response) is closed (slow-header attacks)."
    )
    max_connections: int = Field(
        512, gt=0, description="Open connections the controller accepts; beyond, new ones are "
        "closed at once (each instance keeps about two)."
    )
    keep_alive_s: float = Field(5.0, gt=0, description="Idle keep-alive connections close "
                                "after this.")
    ssl_certfile: str = Field("", description="TLS certificate (PEM) of `kvcore controller`: "
                              "with ssl_keyfile it serves https.")
    ssl_keyfile: str = Field("", description="TLS private key (PEM) of `kvcore controller`.")
    allow_plain_http: bool = Field(
        False, description="Serve plain HTTP on an address beyond loopback (the bearer token "
        "then crosses the network in clear text); without it, or TLS, such a bind is refused."
    )
    auth_reads: bool = Field(
        False, description="Require the token on read endpoints too (lookup, route, instances)."
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not value:
            return value
        example = "for example http://127.0.0.1:8470"
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"expected an http:// or https:// URL, {example}")
        parts = urlsplit(value)
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number in 0..65535
        except ValueError:
            raise ValueError(f"the port is not a number in 0..65535, {example}") from None
        if not parts.hostname:
            raise ValueError(f"the URL names no host, {example}")
        if parts.query or parts.fragment:
            raise ValueError(f"expected no query or fragment, {example}")
        return value
