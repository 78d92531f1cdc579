"""kvcore: a KV-cache layer for LLM inference engines.

The public API: :class:`CacheEngine` (lookup, store, retrieve across tiers), :class:`Namespace`
and :func:`chunk_keys` (chunk keys), :class:`Settings` / :func:`load_settings` (``KVCORE_*``
configuration), and the plugin interfaces in :mod:`kvcore.interfaces`.
"""

from kvcore.config import ConfigError, Settings, load_settings
from kvcore.engine import BufferSource, CacheEngine, ChunkSource, LookupResult
from kvcore.keys import ChunkKey, Namespace, chunk_keys

__version__ = "0.1.0"

__all__ = [
    "BufferSource",
    "CacheEngine",
    "ChunkKey",
    "ChunkSource",
    "ConfigError",
    "LookupResult",
    "Namespace",
    "Settings",
    "chunk_keys",
    "load_settings",
]
