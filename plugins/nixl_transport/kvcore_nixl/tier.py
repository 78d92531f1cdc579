"""The ``nixl_peer`` tier: other instances' CPU tiers as a lower tier of this one.

``KVCORE_TIERS=cpu,nixl_peer`` with ``KVCORE_NIXL_PEERS=host:port,...``: ``contains`` asks the
peers which chunks they hold (no data moves), ``get`` READs them over NIXL; the engine then
promotes them into its own CPU tier. The tier stores nothing itself (``put`` refuses), so
write-behind costs nothing.

Serving is the other half and is not a tier: with ``KVCORE_NIXL_SERVE=1`` the ``nixl_server``
attachment (:func:`serve_engine`) offers the engine's memory tier to peers, whatever its
``KVCORE_TIERS``. Prefill/decode disaggregation and peer-to-peer reuse are then one mechanism:
the prefill side serves, the decode side reads.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvcore.config import load_settings
from kvcore.interfaces import Buffer, MemoryTier, Tier, TierContext, TierUsage
from kvcore.keys import ChunkKey
from kvcore.pending import PendingStores
from kvcore_nixl.agent import Agent, shared_agent
from kvcore_nixl.client import PeerClient, PeerError
from kvcore_nixl.server import ChunkServer
from kvcore_nixl.settings import NixlSettings

if TYPE_CHECKING:
    from kvcore.engine import CacheEngine

log = logging.getLogger("kvcore.nixl.tier")
MAX_READ_BYTES = 4 << 30
"""The most one read may announce where no memory budget bounds it."""


class NixlPeerTier(Tier):
    """Reads chunks from peers over NIXL."""

    name = "nixl_peer"
    framed = False
    """Values are raw payloads from a peer's memory tier: the engine does not unframe them; the
    client has verified each one against the frame header sent with its lease
    (:func:`kvcore.chunk_format.matches`: key, length, checksum)."""

    def __init__(
        self, settings: NixlSettings, max_read_bytes: int = MAX_READ_BYTES,
        agent: Agent | None = None,
    ) -> None:
        """``max_read_bytes``: the most one read may announce before a buffer is taken (the
        engine's memory budget: nothing larger could be promoted)."""
        self.settings = settings
        self._agent = agent
        self.clients = [
            PeerClient(address, self.agent, settings.timeout_s, settings.connect_timeout_s,
                       settings.retry_s, settings.secret_bytes(), max_read_bytes=max_read_bytes)
            for address in settings.peers
        ] if settings.peers else []
        if not self.clients:
            log.info("kvcore nixl: the nixl_peer tier has no KVCORE_NIXL_PEERS; it finds "
                     "nothing (serving needs only KVCORE_NIXL_SERVE=1)")

    @property
    def agent(self) -> Agent:
        if self._agent is None:
            self._agent = shared_agent(self.settings.backend, self.settings.progress_thread)
        return self._agent

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        found = [False] * len(keys)
        todo = list(range(len(keys)))
        for client in self.clients:
            if not todo:
                break
            try:
                hits = client.contains([keys[i] for i in todo])
            except PeerError as exc:
                log.debug("kvcore nixl: %s", exc)
                continue
            for i, hit in zip(todo, hits):
                found[i] = hit
            todo = [i for i, hit in zip(todo, hits) if not hit]
        return found

    def get(self, keys: Sequence[ChunkKey]) -> list[Buffer | None]:
        values: list[Buffer | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        for client in self.clients:
            if not todo:
                break
            got = client.read([keys[i] for i in todo], self.settings.timeout_s)
            for i, value in zip(todo, got):
                values[i] = value
            todo = [i for i in todo if values[i] is None]
        return values

    def put(self, items: Sequence[tuple[ChunkKey, Sequence[Buffer]]]) -> list[bool]:
        return [False] * len(items)

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        return 0

    def usage(self) -> TierUsage:
        return TierUsage(0, 0, 0)

    def close(self) -> None:
        for client in self.clients:
            client.close()


def start_server(
    memory: MemoryTier, settings: NixlSettings | None = None, agent: Agent | None = None,
    pending: PendingStores | None = None,
) -> ChunkServer | None:
    """Serve ``memory`` to peers on ``settings.listen``; ``None`` (logged) if that fails.

    For connectors that build their own memory tier: call once in the process that stores KV.
    """
    settings = settings or load_settings(NixlSettings)
    try:
        agent = agent or shared_agent(settings.backend, settings.progress_thread)
        return ChunkServer(memory, agent, settings.listen, settings.lease_timeout_s, pending,
                           settings.store_wait_s, settings.secret_bytes(), settings.limits())
    except Exception as exc:
        log.warning("kvcore nixl: cannot serve on %s: %s", settings.listen, exc)
        return None


def make_peer_tier(context: TierContext) -> NixlPeerTier:
    """The ``nixl_peer`` tier for an engine; one read is bounded by its memory budget."""
    budget = context.memory.budget if context.memory is not None else MAX_READ_BYTES
    return NixlPeerTier(load_settings(NixlSettings), max_read_bytes=budget)


def serve_engine(engine: CacheEngine) -> ChunkServer | None:
    """The ``nixl_server`` attachment: serve ``engine``'s memory tier when
    ``KVCORE_NIXL_SERVE=1``, with its stores in progress counted as held."""
    settings = load_settings(NixlSettings)
    if not settings.serve:
        return None
    return start_server(engine.memory, settings, pending=engine.pending)
