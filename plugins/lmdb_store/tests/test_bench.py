"""`kvcore bench disk` runs and reports the figures the issue asks for (no timing asserted)."""

from __future__ import annotations

import argparse

from kvcore_lmdb import bench


def test_bench_disk_reports_ratios(tmp_path) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--chunk-mib", "0.25", "--chunks", "4", "--batch", "2",
                              "--rounds", "1", "--dir", str(tmp_path)])
    figures = bench.run(args)
    for name in ("tier_write_gbps", "raw_write_gbps", "tier_read_gbps", "raw_read_gbps",
                 "ratio_write", "ratio_read"):
        assert figures[name] > 0
    assert figures["chunk_bytes"] == 256 * 1024
    assert list(tmp_path.iterdir()) == []  # cleans up after itself
