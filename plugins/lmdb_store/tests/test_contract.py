"""The core's tier contract, with payloads in files and with small values inline in LMDB."""

from __future__ import annotations

import pytest

from kvcore.eviction.lru import LRUPolicy
from kvcore.testing.tier_contract import LowerTierContract
from kvcore_lmdb.settings import LmdbSettings
from kvcore_lmdb.tier import LmdbTier


class TestLmdbTierFiles(LowerTierContract):
    chunk_bytes = 4096
    inline_max = 0

    @pytest.fixture
    def tier(self, tmp_path):
        settings = LmdbSettings(path=tmp_path / "store", size=128 * 1024,
                                inline_max=self.inline_max)
        tier = LmdbTier(settings, LRUPolicy)
        yield tier
        tier.close()


class TestLmdbTierInline(TestLmdbTierFiles):
    inline_max = 64 * 1024
