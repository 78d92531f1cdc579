"""``kvcore server``: one shared-memory cache per host for every engine on it."""

from __future__ import annotations

import argparse
import logging

from kvcore.config import ConfigError, load_settings


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "server", help="run the per-host cache server (shared memory tier for local engines)",
        description="Keep the memory tier in shared memory and serve it to every engine on "
        "this host that sets the same KVCORE_SERVER_URL. Takes the KVCORE_* settings an engine "
        "takes (KVCORE_CPU_SIZE is the shared tier's budget, KVCORE_EVICTION its policy) and "
        "KVCORE_SERVER_* (URL, lease, group); --url overrides KVCORE_SERVER_URL. The server owns "
        "the lower tiers too (KVCORE_TIERS after the first), their write-behind and the "
        "controller reporting. See docs/server.md.")
    parser.add_argument("--url", help="where to listen, for example "
                                      "unix:///run/kvcore/kvcore.sock (KVCORE_SERVER_URL)")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from kvcore.server.service import run_server
        from kvcore.server.settings import ServerSettings
    except ImportError as exc:
        raise ConfigError(f"the server needs pyzmq and msgspec ({exc.name} is missing): "
                          "pip install 'kvcore[events]'") from None
    server = load_settings(ServerSettings, **({"url": args.url} if args.url else {}))
    if not server.url:
        raise ConfigError("KVCORE_SERVER_URL is not set (or pass --url): for example "
                          "unix:///run/kvcore/kvcore.sock")
    logging.getLogger("kvcore").setLevel(args.log_level.upper())
    logging.getLogger("kvcore.server").setLevel(args.log_level.upper())
    run_server(load_settings(), server)
    return 0
