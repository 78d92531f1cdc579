"""kvcore-nixl: move chunk buffers between kvcore instances over NIXL.

- :class:`~kvcore_nixl.server.ChunkServer` exposes a process's memory tier to peers;
- :class:`~kvcore_nixl.client.PeerClient` asks a peer which chunks it holds and reads them
  with one NIXL READ per batch;
- the ``nixl_peer`` tier (:mod:`kvcore_nixl.tier`) puts both behind kvcore's tier interface;
- :mod:`kvcore_nixl.proxy` fronts a prefill and a decode server for P/D disaggregation.
"""

__version__ = "0.1.0"
