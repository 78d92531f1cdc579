"""Settings of the SGLang backend: ``KVCORE_SGLANG_*`` variables or the ``sglang:`` file table.

Keys of ``--hicache-storage-backend-extra-config`` with the same names win over them (see
:func:`from_extra_config`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from kvcore.config import PluginSettings, load_settings


class SGLangSettings(PluginSettings):
    """How SGLang pages map into kvcore."""

    model_config = SettingsConfigDict(env_prefix="KVCORE_SGLANG_")
    file_section: ClassVar[str] = "sglang"

    tenant: str = Field(
        "", description="Tenant salt: pages stored under one tenant are invisible to every other."
    )
    model: str = Field(
        "", description="Model identity for keys; empty uses SGLang's model name (plus revision)."
    )
    store_timeout_s: float = Field(
        30.0, gt=0, description="Longest wait for a page set to land in the CPU tier."
    )


EXTRA_CONFIG_KEYS = ("tenant", "model", "store_timeout_s")
"""Extra-config keys that override :class:`SGLangSettings` fields."""


def from_extra_config(extra: dict[str, Any] | None) -> SGLangSettings:
    """Settings from the environment/file, overridden by SGLang's extra config."""
    extra = extra or {}
    overrides = {k: extra[k] for k in EXTRA_CONFIG_KEYS if extra.get(k) is not None}
    return load_settings(SGLangSettings, **overrides)
