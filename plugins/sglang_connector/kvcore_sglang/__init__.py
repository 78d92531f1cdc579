"""kvcore-sglang: kvcore's tiers as an SGLang HiCache storage backend.

SGLang loads :class:`kvcore_sglang.backend.KVCoreHiCacheStorage` with
``--hicache-storage-backend dynamic`` (see docs/sglang.md). Importing this package does not import
SGLang; only :mod:`kvcore_sglang.backend` does.
"""

BACKEND_MODULE = "kvcore_sglang.backend"
BACKEND_CLASS = "KVCoreHiCacheStorage"
SUPPORTED_SGLANG = ">=0.5.10,<0.6"
"""SGLang versions declared (not a pip requirement); tested with 0.5.23, see docs/sglang.md."""

__all__ = ["BACKEND_CLASS", "BACKEND_MODULE", "SUPPORTED_SGLANG"]
