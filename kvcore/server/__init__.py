"""``kvcore server``: one shared-memory cache per host, shared by every engine on it
(docs/server.md). :mod:`~kvcore.server.service` is the server, :mod:`~kvcore.server.client`
the engines' tier, :mod:`~kvcore.server.protocol` what they say to each other,
:mod:`~kvcore.server.arena` the shared memory."""
