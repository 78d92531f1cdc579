"""Settings of the disk tier: ``KVCORE_LMDB_*`` variables or the ``lmdb:`` table of the file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from kvcore.config import ByteSize, PluginSettings


def _default_path() -> str:
    """``$XDG_STATE_HOME/kvcore/lmdb`` (``~/.local/state/kvcore/lmdb``): not under ~/.cache,
    whose files cache cleaners delete while the store is open."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(state) / "kvcore" / "lmdb")


class LmdbSettings(PluginSettings):
    """Where the store lives and how large it may grow."""

    model_config = SettingsConfigDict(env_prefix="KVCORE_LMDB_")
    file_section: ClassVar[str] = "lmdb"

    path: str = Field(
        default_factory=_default_path,
        description="Directory of the store (created if missing; ~ is expanded); shared by every "
        "process on the host that names it.",
    )
    size: ByteSize = Field(
        16 * 1024**3,
        description="Byte budget of the whole store, for all processes together (units: 512MiB, "
        "16GiB, ...).",
    )
    inline_max: ByteSize = Field(
        64 * 1024,
        description="Values up to this size are kept inside LMDB; larger ones in their own file.",
    )
    fsync: bool = Field(
        False,
        description="fsync payload files before indexing them (survive power loss, not only "
        "process crashes); slower.",
    )
    codec: str = Field(
        "none",
        description="Codec of the chunks this tier stores: none (raw bytes), shuffle-zstd "
        "(lossless; pip install 'kvcore[compression]'), int8 or int4 (lossy group quantization "
        "of bfloat16/float16 KV), or one a plugin registers. docs/codecs.md has the figures.",
    )
    check_s: float = Field(
        1.0, gt=0,
        description="Seconds between checks that the index files (data.mdb, lock.mdb) are still "
        "the ones opened; every write checks too. Removed or replaced files are reopened (a "
        "removed data.mdb is first restored from the open copy) with one warning.",
    )
    retry_s: float = Field(
        30.0, gt=0, description="Seconds between attempts to open a store that failed to open."
    )

    @field_validator("path", mode="before")
    @classmethod
    def _path_as_text(cls, value: object) -> object:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("path")
    @classmethod
    def _path_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("expected a directory, for example ~/.local/state/kvcore/lmdb "
                             "(an empty path would put the store in the working directory)")
        return value
