"""Built-in plugin registering ``kvcore bench replay`` through the benchmarks hook."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from kvcore.hookspecs import hookimpl


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", default=None,
                        help="Mooncake-format trace (default: a synthetic document trace)")
    parser.add_argument("--capacity-blocks", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--policy", default="prefix_value")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kvcore.trace.format import load_trace
    from kvcore.trace.report import compare
    from kvcore.trace.synth import documents

    requests = load_trace(args.trace) if args.trace else documents(3000)
    started = time.perf_counter()
    figures: dict[str, Any] = {"trace": args.trace or "synthetic documents(3000)",
                               "policy": args.policy}
    for capacity in args.capacity_blocks:
        row = compare(requests, capacity, args.policy)
        for name in ("hit_ratio", "lru_hit_ratio", "belady_hit_ratio", "ratio_to_belady",
                     "lru_ratio_to_belady", "replay_requests_per_s"):
            figures[f"{capacity}_{name}"] = round(row[name], 4)
    figures["seconds"] = round(time.perf_counter() - started, 2)
    return figures


@hookimpl
def kvcore_register_benchmarks(register: Callable[..., None]) -> None:
    register("replay", add_arguments, run)
