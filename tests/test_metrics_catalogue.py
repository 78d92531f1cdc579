"""Every metric the code records is in the catalogue (one place for names and help texts)."""

from __future__ import annotations

import re
from pathlib import Path

from kvcore.metrics import CATALOGUE

ROOT = Path(__file__).resolve().parents[1]
RECORDED = re.compile(r"\.(?:inc|observe)\(\s*\"([a-z_]+)\"")
COUNTER = re.compile(r"counter=\"([a-z_]+)\"")


def test_every_recorded_metric_is_catalogued() -> None:
    sources = [*ROOT.glob("kvcore/**/*.py"), *ROOT.glob("plugins/*/kvcore_*/**/*.py")]
    names: set[str] = set()
    for path in sources:
        text = path.read_text()
        names.update(RECORDED.findall(text))
        names.update(COUNTER.findall(text))
    assert len(names) > 30  # the pattern still finds the calls
    missing = sorted(n for n in names if n not in CATALOGUE)
    assert not missing, f"not in kvcore.metrics.CATALOGUE: {missing}"


def test_admissions_are_counted_under_their_catalogued_name() -> None:
    from kvcore.config import load_settings
    from kvcore.engine import CacheEngine
    from kvcore.keys import Namespace, chunk_keys

    with CacheEngine(load_settings(chunk_size=4)) as engine:
        engine.subscribe(lambda *event: None)
        keys = chunk_keys(Namespace("catalogue"), range(8), 4)
        assert engine.store_buffers(keys, [b"x" * 16, b"y" * 16]).wait(5) == 2
        counters = engine.metrics.snapshot()["counters"]
    assert counters["chunks_admitted_total"] == {"cpu": 2}


def test_bytes_stored_counts_only_what_a_tier_accepted() -> None:
    from kvcore.config import load_settings
    from kvcore.engine import CacheEngine
    from kvcore.eviction.lru import LRUPolicy
    from kvcore.interfaces import Tier, TierUsage
    from kvcore.keys import Namespace, chunk_keys
    from kvcore.tiers.cpu import CpuTier

    class Refusing(Tier):
        name = "refusing"

        def contains(self, keys):  # type: ignore[no-untyped-def]
            return [False] * len(keys)

        def get(self, keys):  # type: ignore[no-untyped-def]
            return [None] * len(keys)

        def put(self, items):  # type: ignore[no-untyped-def]
            return [i == 0 for i in range(len(items))]  # only the first fits

        def delete(self, keys):  # type: ignore[no-untyped-def]
            return 0

        def usage(self) -> TierUsage:
            return TierUsage(0, 0, 0)

    settings = load_settings(chunk_size=4)
    with CacheEngine(settings, tiers=[CpuTier(1 << 20, LRUPolicy()), Refusing()]) as engine:
        keys = chunk_keys(Namespace("refused"), range(12), 4)
        assert engine.store_buffers(keys, [b"a" * 16] * 3).wait(5) == 3
        assert engine.flush(5)
        counters = engine.metrics.snapshot()["counters"]
    assert counters["bytes_stored_total"] == {"cpu": 48, "refusing": 16}
