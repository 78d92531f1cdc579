"""``kvcore bench NAME [--json]``: benchmarks registered by the core and by plugins.

Each benchmark is registered through the ``kvcore_register_benchmarks`` hook with a function
that adds its options and one that runs it and returns a dict of figures.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

from kvcore.cli.main import print_json
from kvcore.plugins import get_registry

KNOWN_PLUGIN_BENCHMARKS = {
    "disk": "kvcore-lmdb",
    "redis": "kvcore-redis",
    "transfer": "kvcore-nixl",
    "engine": "kvcore-vllm",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="run a benchmark (copy, replay, disk, redis, ...)")
    bench_sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    registry = get_registry()
    for name, (add_arguments, run) in sorted(registry.benchmarks.items()):
        bench_parser = bench_sub.add_parser(name, help=f"{name} benchmark")
        bench_parser.add_argument("--json", action="store_true", help="print figures as JSON")
        add_arguments(bench_parser)
        bench_parser.set_defaults(func=_runner(run))
    for name, dist in KNOWN_PLUGIN_BENCHMARKS.items():
        if name not in registry.benchmarks:
            missing = bench_sub.add_parser(name, help=f"needs {dist} (not installed)")
            missing.add_argument("--json", action="store_true")
            missing.set_defaults(func=_missing(name, dist))


class _Progress:
    """Elapsed time of a running benchmark on stderr (a live line on a terminal)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True)

    def _tick(self) -> None:
        started = time.monotonic()
        tty = sys.stderr.isatty()
        period = 1.0 if tty else 15.0
        while not self._stop.wait(period):
            elapsed = time.monotonic() - started
            end = "\r" if tty else "\n"
            print(f"kvcore bench {self.name}: running, {elapsed:4.0f}s", end=end,
                  file=sys.stderr, flush=True)

    def __enter__(self) -> _Progress:
        print(f"kvcore bench {self.name}: started", file=sys.stderr, flush=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        print(f"kvcore bench {self.name}: done" + " " * 20, file=sys.stderr, flush=True)


def _runner(run):  # type: ignore[no-untyped-def]
    def func(args: argparse.Namespace) -> int:
        with _Progress(args.bench):
            figures = run(args)
        if args.json:
            print_json(figures)
        else:
            for key, value in figures.items():
                print(f"{key:<28} {value}")
        return 0

    return func


def _missing(name: str, dist: str):  # type: ignore[no-untyped-def]
    def func(args: argparse.Namespace) -> int:
        print(f"kvcore bench {name}: the plugin {dist} is not installed "
              f"(pip install {dist}); nothing measured", file=sys.stderr)
        return 3

    return func
