"""``kvcore controller``: run the control API (needs ``pip install 'kvcore[controller]'``)."""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys

from kvcore.config import ConfigError, load_settings


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "controller", help="run the controller: global cache index and control API",
        description="Serve the control API. Settings come from KVCORE_CONTROLLER_* "
                    "(KVCORE_CONTROLLER_TOKEN is required); flags override them.")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8470; 0 picks a free one)")
    parser.add_argument("--allow-plain-http", action="store_true", default=None,
                        help="serve plain HTTP beyond loopback "
                             "(KVCORE_CONTROLLER_ALLOW_PLAIN_HTTP)")
    parser.add_argument("--log-level", default="warning",
                        choices=["debug", "info", "warning", "error"])
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvcore.control.settings import ControllerSettings

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port),
                                   ("allow_plain_http", args.allow_plain_http)) if v is not None}
    settings = load_settings(ControllerSettings, **overrides)
    if not settings.token.get_secret_value():
        raise ConfigError("KVCORE_CONTROLLER_TOKEN is not set: the controller needs a bearer "
                          "token for its mutating endpoints (any long random string)")
    try:
        import uvicorn

        from kvcore.control.server import create_app
        from kvcore.control.serving import check_exposure, install_log_budget, uvicorn_options
    except ImportError as exc:
        raise ConfigError(f"the controller needs FastAPI and uvicorn ({exc.name} is missing): "
                          "pip install 'kvcore[controller]'") from None
    warning = check_exposure(settings)
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        raise ConfigError(f"KVCORE_CONTROLLER_HOST/PORT: cannot bind {settings.host}:"
                          f"{settings.port} ({exc.strerror})") from None
    sock.listen(128)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    scheme = "https" if settings.ssl_certfile else "http"
    if warning:
        print(warning, file=sys.stderr, flush=True)
    print(f"kvcore controller: listening on {scheme}://{shown}:{port}", flush=True)
    config = uvicorn.Config(create_app(settings), log_level=args.log_level,
                            **uvicorn_options(settings))
    config.load()
    install_log_budget()  # after uvicorn set up its loggers
    server = uvicorn.Server(config)
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        sock.close()
    return 0
