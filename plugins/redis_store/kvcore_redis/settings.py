"""Settings of the Redis tier: ``KVCORE_REDIS_*`` variables or the ``redis:`` config table."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from kvcore.config import ByteSize, ConfigError, PluginSettings

MiB = 1024**2


class RedisSettings(PluginSettings):
    """Where the Redis tier connects and how it stores chunks."""

    model_config = SettingsConfigDict(env_prefix="KVCORE_REDIS_")
    file_section: ClassVar[str] = "redis"

    url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:6379/0"),
        description=(
            "Server: redis://[user:pass@]host:port/db, rediss:// (TLS), unix:///path.sock, or a "
            "cluster: redis+cluster://host1:port1,host2:port2 or several comma-separated URLs."
        ),
    )
    username: str | None = Field(None, description="ACL user (overrides the one in the URL).")
    password: SecretStr | None = Field(
        None, description="Password (overrides the one in the URL); never printed."
    )
    size: ByteSize = Field(
        0,
        description=(
            "Bytes of the server this deployment counts on (reported as the budget); 0 uses the "
            "server's maxmemory. The server evicts (maxmemory-policy), not kvcore."
        ),
    )
    prefix: str = Field("kvcore:", description="Prefix of every key kvcore writes.")
    part_size: ByteSize = Field(
        4 * MiB, ge=64 * 1024, description="Values larger than this are stored as several keys."
    )
    max_value_bytes: ByteSize = Field(
        256 * MiB, ge=64 * 1024,
        description=(
            "Largest chunk value (frame header + KV bytes) the tier stores or reads: a larger "
            "put is refused, and a manifest that claims more is corrupt and removed before "
            "anything is allocated (and a split value is read only after every part was seen "
            "at its size). The default fits a 256-token chunk of a 405B-parameter model in bf16 "
            "(126 MiB) twice."
        ),
    )
    codec: str = Field(
        "none",
        description="Codec of the chunks this tier stores: none (raw bytes), shuffle-zstd "
        "(lossless; pip install 'kvcore[compression]'), int8 or int4 (lossy group quantization "
        "of bfloat16/float16 KV), or one a plugin registers. docs/codecs.md has the figures.",
    )
    ttl_s: float = Field(0.0, ge=0, description="Expire chunks after this many seconds (0: never).")
    socket_timeout_s: float = Field(2.0, gt=0, description="Longest wait for one reply.")
    connect_timeout_s: float = Field(1.0, gt=0, description="Longest wait to connect.")
    retry_interval_s: float = Field(
        1.0, gt=0, description="After a failure, calls are misses for this long before a retry."
    )
    max_connections: int = Field(64, gt=0, description="Connections per server node.")

    def check(self) -> None:
        """What the tier refuses when it is built: an unusable URL, braces in the prefix (they
        would break the cluster hash tags)."""
        from kvcore_redis.urls import parse_endpoint

        parse_endpoint(self.url.get_secret_value())
        if "{" in self.prefix or "}" in self.prefix:
            raise ConfigError(f"KVCORE_REDIS_PREFIX={self.prefix!r}: must not hold braces")
