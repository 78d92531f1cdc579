"""Settings of the batched copy kernels (``KVCORE_COPY_*``, ``KVCORE_NATIVE_DIR``).

``KVCORE_COPY_THREADS`` and ``KVCORE_COPY_STREAMING`` are read by the native CPU library itself,
from the environment only (it starts before any Python code asks); declaring them here lists
them in ``kvcore config`` and the reference and lets ``kvcore config``/``doctor`` reject a bad
value. On the copy path a bad value never fails a copy: it is logged once and the defaults apply.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from kvcore.config import ConfigError, PluginSettings, load_settings

log = logging.getLogger("kvcore.copy")


class CopySettings(PluginSettings):
    """How kvcore copies KV between an engine's paged blocks and chunk buffers."""

    model_config = SettingsConfigDict(env_prefix="KVCORE_")
    # top-level keys of the config file (copy_backend: ...), like the variables

    copy_backend: Literal["auto", "native", "fallback", "torch", "numpy"] = Field(
        "auto", description="auto: the native kernels when they load, else the torch fallback; "
        "fallback (or torch, numpy): never load the native kernels; native: the same as auto.",
    )
    copy_cuda_mode: Literal["direct", "staged"] = Field(
        "direct", description="GPU copies: direct (the kernel reads host memory) or staged "
        "(through a device buffer).",
    )
    copy_threads: int = Field(
        0, ge=0, le=4096, description="Threads of the native CPU copy (0: min(cores, 4)); "
        "read from the environment by the native library.",
    )
    copy_streaming: bool = Field(
        True, description="Non-temporal stores in the native CPU copy for large chunks; read "
        "from the environment by the native library, where a value starting with 0 turns them "
        "off (use 0 or 1).",
    )
    native_dir: Path | None = Field(
        None, description="Directory of the native libraries (default: kvcore/_native).",
    )

    @field_validator("copy_backend", "copy_cuda_mode", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("native_dir")
    @classmethod
    def _not_empty(cls, value: Path | None) -> Path | None:
        if value is not None and not str(value).strip():
            raise ValueError("an empty path; unset it for the default")
        return value


_VARIABLES = ("KVCORE_COPY_BACKEND", "KVCORE_COPY_CUDA_MODE", "KVCORE_COPY_THREADS",
              "KVCORE_COPY_STREAMING", "KVCORE_NATIVE_DIR", "KVCORE_CONFIG_FILE")


def copy_settings() -> CopySettings:
    """The current copy settings (read again when one of their variables changes)."""
    return _load(tuple(os.environ.get(v) for v in _VARIABLES))


@functools.lru_cache(maxsize=8)
def _load(_environment: tuple[str | None, ...]) -> CopySettings:
    try:
        return load_settings(CopySettings)
    except ConfigError as exc:  # a copy never fails for a setting: defaults, one warning
        log.warning("kvcore copy: %s; using the defaults (kvcore doctor checks them)", exc)
        return CopySettings.model_construct()
