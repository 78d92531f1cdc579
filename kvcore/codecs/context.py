"""What the engine knows to encode and decode chunks: the codec instances, each namespace's
element type, and which chunks in memory came from a lossy codec.

The element type comes from the :class:`~kvcore.keys.Namespace` a connector builds from the
engine's KV spec (vLLM's ``kv_cache_spec.dtype``, SGLang's pool dtype): the engine notes it
whenever it derives keys from a namespace, and a chunk whose namespace it has not seen is stored
raw. Both maps are bounded.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np

from kvcore.config import ConfigError
from kvcore.interfaces import Codec, CodecError
from kvcore.keys import NAMESPACE_BYTES, ChunkKey, Namespace

if TYPE_CHECKING:
    from kvcore.plugins import PluginRegistry

RAW = "none"
MAX_NAMESPACES = 4096
MAX_LOSSY_NOTES = 65536
"""Chunks remembered as loaded through a lossy codec. Beyond it the oldest are forgotten: a
verifier then compares such a chunk with the raw recompute, may count it a mismatch and replaces
it with fresh KV (never a wrong load; a reload at worst)."""


class _Bounded(OrderedDict[bytes, str]):
    """An insertion-ordered map that drops its oldest entries beyond ``limit``."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key: bytes, value: str) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


class CodecContext:
    """Codecs by name, namespace element types, and the lossy origin of chunks in memory."""

    def __init__(self, registry: PluginRegistry) -> None:
        self.registry = registry
        self._codecs: dict[str, Codec | None] = {}
        self._dtypes = _Bounded(MAX_NAMESPACES)
        self._lossy = _Bounded(MAX_LOSSY_NOTES)
        self._lock = threading.Lock()

    # -- codecs ------------------------------------------------------------------------------

    def configured(self, name: str, variable: str) -> Codec | None:
        """The codec a setting names (``None`` for ``"none"``); a :class:`ConfigError` naming
        ``variable`` when it is unknown or its library is missing."""
        if name == RAW:
            return None
        factory = self.registry.codec_factory(name, variable)
        with self._lock:
            if self._codecs.get(name) is None:
                try:
                    self._codecs[name] = factory()
                except ImportError as exc:
                    raise ConfigError(f"{variable}={name}: needs {exc.name or 'a library'}; "
                                      "pip install 'kvcore[compression]'") from exc
            return self._codecs[name]

    def by_name(self, name: str) -> Codec | None:
        """The codec that wrote a frame (any registered one: another engine may have chosen
        it), or ``None`` when it is unknown here or cannot load."""
        factory = self.registry.codecs.get(name)
        if factory is None:
            return None  # a name read from a tier: never cached (unbounded), never built
        with self._lock:
            if name not in self._codecs:
                try:
                    self._codecs[name] = factory()
                except Exception:  # noqa: BLE001 - a codec that cannot load reads as a miss
                    self._codecs[name] = None
            return self._codecs[name]

    # -- element types -------------------------------------------------------------------------

    def note_namespace(self, namespace: Namespace) -> None:
        """Remember ``namespace``'s element type for its chunks' keys."""
        digest = namespace.digest
        with self._lock:
            if self._dtypes.get(digest) != namespace.dtype:
                self._dtypes.put(digest, namespace.dtype)

    def dtype_of(self, key: ChunkKey) -> str | None:
        """The element type of ``key``'s namespace, if a connector has named it."""
        with self._lock:
            return self._dtypes.get(bytes(key[:NAMESPACE_BYTES]))

    # -- lossy origins -------------------------------------------------------------------------

    def note_loaded(self, key: ChunkKey, codec: str) -> None:
        """``key`` entered memory decoded by ``codec`` (only lossy ones are remembered)."""
        found = self.by_name(codec)
        with self._lock:
            if found is not None and found.lossy:
                self._lossy.put(bytes(key), codec)
            else:
                self._lossy.pop(bytes(key), None)

    def forget(self, keys: list[ChunkKey]) -> None:
        """``keys`` were stored afresh: their memory copies are exact again."""
        with self._lock:
            for key in keys:
                self._lossy.pop(bytes(key), None)

    def loaded_codec(self, key: ChunkKey) -> str | None:
        with self._lock:
            return self._lossy.get(bytes(key))

    def as_loaded(self, key: ChunkKey, fresh: np.ndarray) -> np.ndarray:
        """``fresh`` KV for ``key`` as kvcore's copy should be: through the lossy codec the copy
        came from (deterministic), else unchanged. What a verifier compares against."""
        name = self.loaded_codec(key)
        codec = self.by_name(name) if name is not None else None
        dtype = self.dtype_of(key)
        if codec is None or dtype is None:
            return fresh
        encoded = codec.encode(fresh.data.cast("B"), dtype)
        if encoded is None:
            return fresh
        try:
            decoded = codec.decode(memoryview(encoded).cast("B"), fresh.nbytes)
        except CodecError:
            return fresh
        return np.frombuffer(decoded, dtype=np.uint8)
