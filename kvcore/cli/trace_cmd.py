"""``kvcore trace replay``: replay a Mooncake-format trace through kvcore's engine and policies;
``kvcore trace synth``: write a synthetic trace of a chosen shape."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from kvcore.cli.main import print_json
from kvcore.config import load_settings
from kvcore.trace import synth
from kvcore.trace.format import Request, TraceError, load_trace
from kvcore.trace.report import compare
from kvcore.trace.truncate import Truncation

SHAPES: dict[str, Callable[..., list[Request]]] = {
    "sessions": synth.sessions, "conversations": synth.conversations,
    "documents": synth.documents}


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("trace", help="request traces: replay one through the cache")
    trace_sub = parser.add_subparsers(dest="trace_command", required=True, metavar="ACTION")
    replay = trace_sub.add_parser(
        "replay", help="hit ratio of a policy vs LRU and Belady on a Mooncake-format trace")
    replay.add_argument("--trace", required=True, help="JSONL file (timestamp, hash_ids, ...)")
    replay.add_argument("--capacity-blocks", type=int, required=True,
                        help="CPU tier budget in blocks")
    replay.add_argument("--policy", default=None,
                        help="eviction policy (default: the eviction setting)")
    replay.add_argument("--truncate-to", type=int, default=None, metavar="TOKENS",
                        help="cut requests longer than TOKENS")
    replay.add_argument("--truncate-mode", choices=("tail", "stable"), default="tail",
                        help="tail: keep the last TOKENS; stable: keep the head block and a "
                             "stride-aligned tail (cache-friendly)")
    replay.add_argument("--json", action="store_true", help="machine-readable output")
    replay.set_defaults(func=run_replay)
    synth = trace_sub.add_parser(
        "synth", help="write a synthetic Mooncake-format trace of a chosen shape (JSONL)")
    synth.add_argument("shape", choices=sorted(SHAPES),
                       help="sessions: returning chats, most one-off; conversations: active "
                            "multi-turn chats; documents: popular documents and one-off scans")
    synth.add_argument("--requests", type=int, default=3000, help="requests to generate")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--out", default="-", help="file to write (default: standard output)")
    synth.set_defaults(func=run_synth)


def run_replay(args: argparse.Namespace) -> int:
    if args.capacity_blocks <= 0:
        print("kvcore trace replay: --capacity-blocks must be positive", file=sys.stderr)
        return 2
    policy = args.policy or load_settings().eviction
    try:
        requests = load_trace(args.trace)
        truncation = Truncation(args.truncate_to, args.truncate_mode)
    except (TraceError, ValueError) as exc:
        print(f"kvcore trace replay: {exc}", file=sys.stderr)
        return 2
    figures = compare(requests, args.capacity_blocks, policy, truncation)
    if args.truncate_to is not None:
        figures["truncate_to"] = args.truncate_to
        figures["truncate_mode"] = args.truncate_mode
    if args.json:
        print_json(figures)
    else:
        for key, value in figures.items():
            shown = f"{value:.4f}" if isinstance(value, float) else value
            print(f"{key:<24} {shown}")
    return 0


def run_synth(args: argparse.Namespace) -> int:
    if args.requests <= 0:
        print("kvcore trace synth: --requests must be positive", file=sys.stderr)
        return 2
    text = synth.to_jsonl(SHAPES[args.shape](args.requests, seed=args.seed))
    if args.out == "-":
        sys.stdout.write(text)
    else:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0
