"""Parse ``KVCORE_REDIS_URL`` into connection arguments, and redact URLs for messages.

Accepted forms::

    redis://[[user]:password@]host[:port][/db]      one server
    rediss://...                                     one server over TLS
    unix://[[user]:password@]/path/to/redis.sock[?db=N]
    redis+cluster://[[user]:password@]h1:p1,h2:p2    Redis Cluster, seed nodes (rediss+cluster: TLS)
    redis://h1:p1,redis://h2:p2                      Redis Cluster, one URL per seed node
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from redis.connection import SSLConnection, UnixDomainSocketConnection, parse_url

from kvcore.config import ConfigError

VARIABLE = "KVCORE_REDIS_URL"
_USERINFO = re.compile(r"(?P<scheme>[a-z+]+://)(?P<user>[^:@/]*)(?::[^@/]*)?@")


def redact(url: str) -> str:
    """The URL with any password replaced by ``***`` (safe to log)."""
    return _USERINFO.sub(
        lambda m: f"{m['scheme']}{m['user']}:***@" if "@" in m[0] and ":" in m[0][len(m['scheme']):]
        else m[0],
        url,
    )


@dataclass
class Endpoint:
    """Where to connect: one server, or the seed nodes of a cluster."""

    cluster: bool
    nodes: list[tuple[str, int]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for redis-py: credentials, db, TLS, unix socket path."""
    shown: str = ""
    """The URL as it may be logged (password redacted)."""


def parse_endpoint(url: str) -> Endpoint:
    """Parse a URL (see the module docstring); raise ConfigError naming KVCORE_REDIS_URL."""
    shown = redact(url.strip())
    text = url.strip()
    if not text:
        raise ConfigError(f"{VARIABLE} is empty; expected for example redis://127.0.0.1:6379/0")
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise ConfigError(f"{VARIABLE}={shown!r}: expected a URL such as redis://host:6379/0")
    scheme = scheme.lower()
    if scheme in ("redis+cluster", "rediss+cluster"):
        base = scheme.split("+")[0]
        userinfo, at, hosts = rest.rpartition("@")
        hosts, _, tail = hosts.partition("/")
        urls = [f"{base}://{userinfo}{at}{h.strip()}" for h in hosts.split(",") if h.strip()]
        return _cluster(urls, shown)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if len(parts) > 1:
        return _cluster(parts, shown)
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"{VARIABLE}={shown!r}: unknown scheme {scheme!r}; expected redis://, rediss://, "
            "unix:// or redis+cluster://"
        )
    options = _parse(text, shown)
    if "path" in options:
        return Endpoint(False, [], options, shown)
    node = (options.pop("host", "127.0.0.1") or "127.0.0.1", int(options.pop("port", 6379) or 6379))
    return Endpoint(False, [node], options, shown)


def _parse(url: str, shown: str) -> dict[str, Any]:
    try:
        options = parse_url(url)
    except ValueError as exc:
        raise ConfigError(f"{VARIABLE}={shown!r}: {redact(str(exc))}") from None
    cls = options.pop("connection_class", None)
    if cls is SSLConnection:
        options["ssl"] = True
    elif cls is UnixDomainSocketConnection:
        options["unix_socket_path"] = options["path"]
    return options


def _cluster(urls: list[str], shown: str) -> Endpoint:
    nodes: list[tuple[str, int]] = []
    options: dict[str, Any] = {}
    for url in urls:
        if not url.lower().startswith(("redis://", "rediss://")):
            raise ConfigError(
                f"{VARIABLE}={shown!r}: each cluster seed must be redis:// or rediss:// host:port"
            )
        parsed = _parse(url, shown)
        nodes.append((parsed.pop("host", "127.0.0.1"), int(parsed.pop("port", 6379) or 6379)))
        if parsed.pop("db", 0):
            raise ConfigError(f"{VARIABLE}={shown!r}: Redis Cluster has only database 0")
        for key, value in parsed.items():
            options.setdefault(key, value)
    if not nodes:
        raise ConfigError(f"{VARIABLE}={shown!r}: no cluster seed nodes given")
    return Endpoint(True, nodes, options, shown)
