"""``kvcore pd-proxy``: the sub-command module for kvcore's CLI (``add_parser(sub)``)."""

from __future__ import annotations

import argparse

from kvcore_nixl import proxy


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("pd-proxy", help="prefill/decode proxy in front of vLLM servers")
    proxy.add_arguments(parser)
    parser.set_defaults(func=proxy.run)
