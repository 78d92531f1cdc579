"""The ``nixl`` transport: :class:`~kvcore.interfaces.Transport` over the same server/client.

Pull model: :meth:`NixlTransport.fetch` READs chunks from a peer's CPU tier. :meth:`send` is not
offered by this transport (every ``False``): in kvcore the receiver pulls, which keeps memory
ownership with the side that holds the bytes and needs no receive buffers at the sender's
mercy.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvcore.config import Settings, load_settings
from kvcore.interfaces import Buffer, MemoryTier, Transport
from kvcore.keys import ChunkKey
from kvcore_nixl.agent import Agent, shared_agent
from kvcore_nixl.client import PeerClient
from kvcore_nixl.server import ChunkServer
from kvcore_nixl.settings import NixlSettings


class NixlTransport(Transport):
    """Fetch from peers; :meth:`serve` exposes a CPU tier so peers can fetch from here."""

    name = "nixl"

    def __init__(self, settings: NixlSettings | None = None, agent: Agent | None = None) -> None:
        self.settings = settings or load_settings(NixlSettings)
        self.agent = agent or shared_agent(self.settings.backend, self.settings.progress_thread)
        self.server: ChunkServer | None = None
        self._clients: dict[str, PeerClient] = {}

    def serve(self, memory: MemoryTier, listen: str | None = None) -> str:
        """Start serving ``memory``; returns :meth:`address`."""
        if self.server is None:
            self.server = ChunkServer(memory, self.agent, listen or self.settings.listen,
                                      self.settings.lease_timeout_s,
                                      secret=self.settings.secret_bytes(),
                                      limits=self.settings.limits())
        return self.server.address

    def address(self) -> str:
        return self.server.address if self.server is not None else ""

    def client(self, peer: str) -> PeerClient:
        if peer not in self._clients:
            s = self.settings
            self._clients[peer] = PeerClient(peer, self.agent, s.timeout_s,
                                             s.connect_timeout_s, s.retry_s, s.secret_bytes())
        return self._clients[peer]

    def fetch(
        self, peer: str, keys: Sequence[ChunkKey], timeout_s: float
    ) -> list[Buffer | None]:
        return list(self.client(peer).read(list(keys), timeout_s))

    def send(
        self, peer: str, items: Sequence[tuple[ChunkKey, Buffer]], timeout_s: float
    ) -> list[bool]:
        return [False] * len(items)

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        if self.server is not None:
            self.server.close()
            self.server = None


def make_transport(settings: Settings) -> NixlTransport:
    return NixlTransport()
