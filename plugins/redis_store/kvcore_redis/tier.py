"""The Redis tier: chunks in one Redis server or a Redis Cluster, shared by many engines.

Every batch call is one pipeline (in cluster mode, one per node, see :mod:`kvcore_redis.wire`).
A server that is down, slow or full never raises out of the tier: the call is a miss (or a
refused put), one warning is logged per outage, and the tier retries by itself after
``KVCORE_REDIS_RETRY_INTERVAL_S``; in a cluster each node is tracked on its own, so a dead node
costs only its own chunks. Only a wrong password fails loudly, at construction.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    AuthenticationError,
    OutOfMemoryError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.retry import Retry

from kvcore.config import ConfigError
from kvcore.interfaces import Buffer, Tier, TierUsage
from kvcore.keys import ChunkKey
from kvcore_redis.health import Health
from kvcore_redis.layout import MANIFEST_BYTES, Manifest, Naming, piece_size, split
from kvcore_redis.settings import RedisSettings
from kvcore_redis.urls import VARIABLE, Endpoint, parse_endpoint, redact
from kvcore_redis.wire import pack_command, pack_get, pack_set, run_pipeline

log = logging.getLogger("kvcore.redis")
T = TypeVar("T")
_FAILURES = (RedisError, RedisClusterException, OSError)
"""What a server that is down, slow or unreachable raises (a cluster client too)."""
_AUTH_WORDS = ("WRONGPASS", "NOAUTH", "invalid username", "authenticated")
_USAGE_TTL_S = 1.0
_UNLINK_IF_SAME = (b"if redis.call('GET', KEYS[1]) == ARGV[1] then "
                   b"return redis.call('UNLINK', unpack(KEYS)) > 0 and 1 or 0 end return 0")
"""Remove a manifest and its parts only if the manifest is still the one that was read."""


class RedisTier(Tier):
    """A lower tier on Redis (see :mod:`kvcore_redis.layout` for how chunks are stored)."""

    name = "redis"
    framed = True

    def __init__(self, settings: RedisSettings | None = None, name: str = "redis") -> None:
        self.settings = settings or RedisSettings()
        self.name = name
        self.codec = self.settings.codec
        self.settings.check()
        self.endpoint: Endpoint = parse_endpoint(self.settings.url.get_secret_value())
        self._secrets = [s for s in (self.endpoint.options.get("password"),
                                     self._setting_password()) if s]
        self.naming = Naming(self.settings.prefix)
        self.health = Health(self.endpoint.shown, self.settings.retry_interval_s)
        self._ttl_ms = int(self.settings.ttl_s * 1000) or None
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._usage: tuple[float, TierUsage] | None = None
        self._nodes: dict[str, Health] = {}
        self.stats = {"corrupt_removed": 0}
        self._probe()

    # -- connection ----------------------------------------------------------------------------

    def _setting_password(self) -> str | None:
        secret = self.settings.password
        return secret.get_secret_value() if secret is not None else None

    def _options(self) -> dict[str, Any]:
        s = self.settings
        options = dict(self.endpoint.options)
        options.pop("path", None)
        if s.username is not None:
            options["username"] = s.username
        if self._setting_password() is not None:
            options["password"] = self._setting_password()
        options.update(
            socket_timeout=s.socket_timeout_s,
            socket_connect_timeout=s.connect_timeout_s,
            socket_keepalive=True,
            max_connections=s.max_connections,
            client_name="kvcore",
        )
        return options

    def _connect(self) -> Any:
        options = self._options()
        if self.endpoint.cluster:
            nodes = [ClusterNode(host, port) for host, port in self.endpoint.nodes]
            return RedisCluster(
                startup_nodes=nodes, require_full_coverage=False,
                retry=Retry(NoBackoff(), 1), **options,
            )
        if "unix_socket_path" not in options:
            options["host"], options["port"] = self.endpoint.nodes[0]
        return redis.Redis(retry=Retry(NoBackoff(), 1), **options)

    def client(self) -> Any:
        """The redis-py client, created on first use (a cluster client connects when created)."""
        client = self._client
        if client is None:
            with self._client_lock:
                if self._client is None:
                    self._client = self._connect()
                client = self._client
        return client

    def _probe(self) -> None:
        """PING once: a wrong password is a ConfigError; an absent server only a warning."""
        try:
            self.client().ping()
        except AuthenticationError as exc:
            raise ConfigError(
                f"{VARIABLE}={self.endpoint.shown!r}: the server refused the credentials "
                f"({self._safe(exc)}); check the user and password in the URL or "
                "KVCORE_REDIS_USERNAME / KVCORE_REDIS_PASSWORD"
            ) from None
        except _FAILURES as exc:
            if any(w in str(exc) for w in _AUTH_WORDS):
                raise ConfigError(
                    f"{VARIABLE}={self.endpoint.shown!r}: the server refused the credentials "
                    f"({self._safe(exc)})"
                ) from None
            self.health.failed("connecting", self._safe(exc))
        else:
            self.health.ok()

    def _safe(self, exc: BaseException) -> str:
        """An exception as text, with URLs and passwords redacted."""
        text = redact(f"{type(exc).__name__}: {exc}")
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _run(self, what: str, op: Callable[[], T], default: T) -> T:
        if not self.health.usable():
            return default
        try:
            result = op()
        except _FAILURES as exc:
            if isinstance(exc, ResponseError) and not _is_oom(exc):
                # The server answered, so it is not down: e.g. an ACL without INFO. Log once.
                self.health.note(f"{what}-refused", f"{what} refused: {self._safe(exc)}")
                return default
            self.health.failed(what, self._safe(exc))
            return default
        self.health.ok()
        return result

    # -- the Tier interface --------------------------------------------------------------------

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        names = [self.naming.chunk(k) for k in keys]

        def op() -> list[bool]:
            replies = self._send([(name, pack_command(b"EXISTS", name)) for name in names])
            return [isinstance(r, int) and r > 0 for r in replies]

        return self._run("contains", op, [False] * len(names)) if names else []

    def get(self, keys: Sequence[ChunkKey]) -> list[Buffer | None]:
        names = [self.naming.chunk(k) for k in keys]
        return self._run("get", lambda: self._get(names), [None] * len(names)) if names else []

    def _get(self, names: list[bytes]) -> list[Buffer | None]:
        values = self._send([(name, pack_get(name, self._ttl_ms)) for name in names])
        out: list[Buffer | None] = [None] * len(names)
        split_values: list[tuple[int, Manifest, bytes]] = []
        corrupt: list[tuple[int, Manifest | None, bytes]] = []
        for i, value in enumerate(values):
            if not isinstance(value, (bytes, bytearray)):
                continue
            manifest = Manifest.decode(value) if len(value) == MANIFEST_BYTES else None
            if manifest is None:
                out[i] = value
            elif not manifest.valid(self.settings.max_value_bytes):
                corrupt.append((i, None, bytes(value)))  # claims more than a chunk can be
            else:
                split_values.append((i, manifest, bytes(value)))
        if split_values:
            # Every part must be there, of the size the manifest says, before a byte is
            # allocated: a forged or orphaned manifest costs one STRLEN per part, no memory.
            lengths = self._send([(names[i], pack_command(b"STRLEN", Naming.part(names[i], j)))
                                  for i, manifest, _ in split_values
                                  for j in range(manifest.parts)])
            pos, whole_ok = 0, []
            for i, manifest, raw in split_values:
                got = lengths[pos:pos + manifest.parts]
                pos += manifest.parts
                if all(g == manifest.part_length(j) for j, g in enumerate(got)):
                    whole_ok.append((i, manifest, raw))
                elif all(isinstance(g, int) for g in got):
                    corrupt.append((i, manifest, raw))  # a part missing or of the wrong size
            split_values = whole_ok
        if split_values:  # read the parts of each chunk straight into one buffer
            commands, dests, wholes = [], [], []
            for i, manifest, _ in split_values:
                whole = bytearray(manifest.total)
                view = memoryview(whole)
                wholes.append(whole)
                for j in range(manifest.parts):
                    start = j * manifest.part_size
                    commands.append((names[i], pack_get(Naming.part(names[i], j), self._ttl_ms)))
                    dests.append(view[start:start + manifest.part_length(j)])
            parts = self._send(commands, dests)
            pos = 0
            for (i, manifest, raw), whole in zip(split_values, wholes):
                received = parts[pos:pos + manifest.parts]
                if all(r is d for r, d in zip(received, dests[pos:pos + manifest.parts])):
                    out[i] = whole
                elif all(r is None or isinstance(r, (bytes, bytearray)) for r in received):
                    corrupt.append((i, manifest, raw))  # removed or resized since STRLEN
                pos += manifest.parts
        if corrupt:
            self._remove_corrupt(names, corrupt)
        return out

    def _remove_corrupt(self, names: list[bytes],
                        corrupt: list[tuple[int, Manifest | None, bytes]]) -> None:
        """Remove manifests whose parts are missing (or that claim too much), with their parts.

        The removal is conditional (a script compares the manifest first): a chunk stored again
        since it was read, by any engine, is left alone.
        """
        commands = []
        for i, manifest, raw in corrupt:
            parts = [Naming.part(names[i], j) for j in range(manifest.parts if manifest else 0)]
            commands.append((names[i], pack_command(
                b"EVAL", _UNLINK_IF_SAME, b"%d" % (1 + len(parts)), names[i], *parts, raw)))
        removed = self._send(commands)
        count = sum(1 for r in removed if r == 1)
        self.stats["corrupt_removed"] += count
        self.health.note("corrupt", f"{len(corrupt)} split chunk(s) had a missing or wrong part "
                         "or claimed more than KVCORE_REDIS_MAX_VALUE_BYTES; read as misses and "
                         "removed")

    def put(self, items: Sequence[tuple[ChunkKey, Sequence[Buffer]]]) -> list[bool]:
        if not items:
            return []
        return self._run("put", lambda: self._put(items), [False] * len(items))

    def _put(self, items: Sequence[tuple[ChunkKey, Sequence[Buffer]]]) -> list[bool]:
        part_size = self.settings.part_size
        commands: list[tuple[bytes, list[Buffer]]] = []  # (key name for routing, RESP buffers)
        spans: list[int] = []
        manifests: dict[int, tuple[bytes, bytes, int]] = {}  # item -> (name, manifest, parts)
        too_big = 0
        for n, (key, parts) in enumerate(items):
            name = self.naming.chunk(key)
            total = sum(memoryview(p).nbytes for p in parts)
            if total > self.settings.max_value_bytes:
                too_big += 1
                spans.append(0)
                continue
            size = piece_size(total, part_size)
            if size is None:
                commands.append((name, pack_set(name, parts, self._ttl_ms)))
                spans.append(1)
                continue
            pieces = list(split(parts, size))
            for j, piece in enumerate(pieces):
                part = Naming.part(name, j)
                commands.append((name, pack_set(part, piece, self._ttl_ms)))
            spans.append(len(pieces))
            manifests[n] = (name, Manifest(len(pieces), total, size).encode(), len(pieces))
        if too_big:
            self.health.note("too-big", f"{too_big} chunk(s) over KVCORE_REDIS_MAX_VALUE_BYTES="
                             f"{self.settings.max_value_bytes} refused")
        results = self._send(commands)
        stored: list[bool] = []
        pos = 0
        full = False
        for span in spans:
            answers = results[pos:pos + span]
            pos += span
            stored.append(bool(span) and all(a == b"OK" for a in answers))
            full = full or any(_is_oom(a) for a in answers)
        if manifests:
            # The manifest is written only after every part of it was stored: a refused part
            # (a full server) never leaves a manifest that lookups count and loads cannot read.
            second: list[tuple[bytes, list[Buffer]]] = []
            order: list[int] = []
            for n, (name, manifest, count) in manifests.items():
                if stored[n]:
                    second.append((name, pack_set(name, [manifest], self._ttl_ms)))
                else:  # drop the parts that did go in
                    second.append((name, pack_command(
                        b"UNLINK", *[Naming.part(name, j) for j in range(count)])))
                order.append(n)
            answers = self._send(second)
            for n, answer in zip(order, answers):
                if stored[n]:
                    stored[n] = answer == b"OK"
                    full = full or _is_oom(answer)
        if full:
            self.health.note("full", "the server is full (OOM with maxmemory); puts are refused "
                             "(set maxmemory-policy allkeys-lru, see docs/redis.md)")
        elif all(stored):
            self.health.clear("full")
        return stored

    def _send(
        self, commands: list[tuple[bytes, list[Buffer]]],
        dests: list[memoryview] | None = None,
    ) -> list[Any]:
        """One pipeline per server node; replies in the order of ``commands``."""
        client = self.client()
        if not self.endpoint.cluster:
            return run_pipeline(client, [c for _, c in commands], dests)
        groups: dict[str, list[int]] = {}
        nodes: dict[str, Any] = {}
        for i, (name, _) in enumerate(commands):
            node = client.get_node_from_key(name)
            groups.setdefault(node.name, []).append(i)
            nodes[node.name] = node
        results: list[Any] = [None] * len(commands)
        moved = False
        for node_name, indices in groups.items():
            health = self._node_health(node_name)
            if not health.usable():
                continue  # a node known down: its chunks are misses, the others still answer
            try:
                connection = client.get_redis_connection(nodes[node_name])
                replies = run_pipeline(connection, [commands[i][1] for i in indices],
                                       [dests[i] for i in indices] if dests else None)
            except _FAILURES as exc:
                health.failed("a call", self._safe(exc))
                moved = True  # maybe a failover: refresh the slot map
                continue
            health.ok()
            for i, reply in zip(indices, replies):
                results[i] = reply
                moved = moved or (isinstance(reply, ResponseError)
                                  and str(reply).startswith(("MOVED", "ASK")))
        if moved:  # slots moved (resharding, failover): refresh the map for the next call
            try:
                client.nodes_manager.initialize()
            except _FAILURES as exc:
                self.health.failed("refreshing the slot map", self._safe(exc))
        return results

    def _node_health(self, node_name: str) -> Health:
        health = self._nodes.get(node_name)
        if health is None:
            health = self._nodes.setdefault(
                node_name, Health(f"cluster node {node_name}", self.settings.retry_interval_s))
        return health

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        names = [self.naming.chunk(k) for k in keys]
        return self._run("delete", lambda: self._delete(names), 0) if names else 0

    def _delete(self, names: list[bytes]) -> int:
        size = b"%d" % MANIFEST_BYTES  # one byte more than a manifest: tells the two apart
        heads = self._send([(n, pack_command(b"GETRANGE", n, b"0", size)) for n in names])
        manifests = [Manifest.decode(h) if isinstance(h, (bytes, bytearray)) else None
                     for h in heads]
        commands = []
        for name, manifest in zip(names, manifests):
            commands.append((name, pack_command(b"UNLINK", name)))
            for j in range(manifest.parts if manifest else 0):
                commands.append((name, pack_command(b"UNLINK", Naming.part(name, j))))
        results = self._send(commands)
        count, pos = 0, 0
        for manifest in manifests:
            removed = results[pos]
            pos += 1 + (manifest.parts if manifest else 0)
            count += removed if isinstance(removed, int) else 0
        return count

    def usage(self) -> TierUsage:
        """Server-wide memory (summed over cluster primaries) against the budget.

        ``budget_bytes`` is KVCORE_REDIS_SIZE, else the server's maxmemory, else the host's
        memory; ``chunks`` counts every key of the server (parts and other users' keys too).
        """
        cached = self._usage
        if cached is not None and time.monotonic() - cached[0] < _USAGE_TTL_S:
            return cached[1]
        fallback = cached[1] if cached else TierUsage(0, self.settings.size, 0)
        usage = self._run("usage", self._read_usage, fallback)
        self._usage = (time.monotonic(), usage)
        return usage

    def _read_usage(self) -> TierUsage:
        client = self.client()
        if self.endpoint.cluster:
            nodes = [(n.name, client.get_redis_connection(n)) for n in client.get_primaries()]
        else:
            nodes = [("", client)]
        used = maxmemory = system = keys = 0
        for node_name, node in nodes:
            if node_name and not self._node_health(node_name).usable():
                continue
            try:
                info = node.info("memory")
                count = int(node.dbsize())
            except _FAILURES as exc:
                if not node_name:
                    raise
                self._node_health(node_name).failed("usage", self._safe(exc))
                continue  # a dead cluster node counts nothing
            used += int(info.get("used_memory", 0))
            maxmemory += int(info.get("maxmemory", 0))
            system += int(info.get("total_system_memory", 0))
            keys += count
        budget = self.settings.size or maxmemory or system
        return TierUsage(used, budget, keys)

    def iter_keys(self) -> Iterator[ChunkKey]:
        """Every chunk key under the prefix (SCAN over every primary in cluster mode)."""
        if not self.health.usable():
            return
        try:
            for name in self.client().scan_iter(match=self.naming.pattern(), count=1000):
                key = self.naming.key_of(name)
                if key is not None:
                    yield key
        except _FAILURES as exc:
            self.health.failed("scan", self._safe(exc))

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except _FAILURES:
                pass


def _is_oom(answer: object) -> bool:
    """Whether a reply is the server's OOM error (maxmemory reached, nothing to evict)."""
    return isinstance(answer, OutOfMemoryError) or (
        isinstance(answer, ResponseError) and "maxmemory" in str(answer))
