"""The built-in codecs, registered like any plugin's."""

from __future__ import annotations

from collections.abc import Callable

from kvcore.codecs.quantize import GroupQuantCodec
from kvcore.codecs.shuffle import ShuffleZstdCodec
from kvcore.hookspecs import hookimpl

INT8_GROUP = 64
INT4_GROUP = 32


@hookimpl
def kvcore_register_codecs(register: Callable[..., None]) -> None:
    register("shuffle-zstd", ShuffleZstdCodec)
    register("int8", lambda: GroupQuantCodec("int8", 8, INT8_GROUP))
    register("int4", lambda: GroupQuantCodec("int4", 4, INT4_GROUP))
