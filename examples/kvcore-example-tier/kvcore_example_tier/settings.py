"""Settings of the example plugin: ``KVCORE_EXAMPLE_*`` or an ``example:`` table in the file."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from kvcore.config import ByteSize, PluginSettings


class ExampleSettings(PluginSettings):
    """Settings of the example tier and attachment."""

    model_config = SettingsConfigDict(env_prefix="KVCORE_EXAMPLE_")
    file_section: ClassVar[str] = "example"

    size: ByteSize = Field(64 * 1024**2, description="Byte budget of the example tier.")
    usage_log_s: float = Field(
        0.0, ge=0.0,
        description="Seconds between the example attachment's usage log lines; 0: off.",
    )
