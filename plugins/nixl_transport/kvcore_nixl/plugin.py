"""kvcore hook implementations of kvcore-nixl (entry point ``nixl``)."""

from __future__ import annotations

from collections.abc import Callable

from kvcore.hookspecs import hookimpl


@hookimpl
def kvcore_register_tiers(register: Callable[..., None]) -> None:
    from kvcore_nixl.tier import make_peer_tier

    register("nixl_peer", make_peer_tier)


@hookimpl
def kvcore_register_attachments(register: Callable[..., None]) -> None:
    from kvcore_nixl.tier import serve_engine

    register("nixl_server", serve_engine)


@hookimpl
def kvcore_register_settings(register: Callable[..., None]) -> None:
    from kvcore_nixl.settings import NixlSettings

    register(NixlSettings)


@hookimpl
def kvcore_register_benchmarks(register: Callable[..., None]) -> None:
    from kvcore_nixl import bench

    register("transfer", bench.add_arguments, bench.run)


@hookimpl
def kvcore_register_commands(register: Callable[..., None]) -> None:
    def add_parser(sub):  # type: ignore[no-untyped-def]
        from kvcore_nixl.cli import add_parser as add_pd_proxy

        add_pd_proxy(sub)

    register("pd-proxy", add_parser)
