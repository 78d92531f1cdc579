"""A subscriber of kvcore's (or vLLM's) KV event stream, for tests and tools: live batches from
the PUB socket, gaps filled from the replay socket, decoded by any msgspec struct type (vLLM's
``KVEventBatch`` in the tests, :class:`kvcore.events.wire.EventBatch` otherwise)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from kvcore.events import wire


class EventSubscriber:
    """Batches by sequence number, in order; :meth:`wait_for` polls until a condition holds."""

    def __init__(self, endpoint: str, replay_endpoint: str | None = None,
                 batch_type: type[Any] = wire.EventBatch, topic: bytes = b"") -> None:
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, topic)
        self._sub.connect(endpoint)
        self._replay_endpoint = replay_endpoint
        self._decoder = msgspec.msgpack.Decoder(batch_type)
        self.batches: dict[int, Any] = {}

    def events(self) -> list[Any]:
        """Every event received so far, in sequence order."""
        return [event for seq in sorted(self.batches) for event in self.batches[seq].events]

    def poll(self, timeout_s: float = 0.05) -> None:
        while self._sub.poll(round(timeout_s * 1000)):
            _topic, seq, payload = self._sub.recv_multipart()
            self.batches[int.from_bytes(seq, "big")] = self._decoder.decode(payload)
            timeout_s = 0

    def replay(self, start: int = 0, timeout_s: float = 5.0) -> list[tuple[int, Any]]:
        """Ask the replay socket for the batches from ``start`` and return them as received.
        Where the publisher's buffer no longer holds ``start``, the first is a snapshot of
        every chunk held, numbered as the newest batch (so not ``start``)."""
        assert self._replay_endpoint is not None, "no replay endpoint"
        req = self._ctx.socket(zmq.DEALER)  # several replies to one request
        req.setsockopt(zmq.LINGER, 0)
        req.connect(self._replay_endpoint)
        got: list[tuple[int, Any]] = []
        try:
            req.send_multipart((b"", start.to_bytes(8, "big")))
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if not req.poll(100):
                    continue
                _empty, _topic, seq, payload = req.recv_multipart()
                if seq == wire.END_SEQ:
                    return got
                got.append((int.from_bytes(seq, "big"), self._decoder.decode(payload)))
            raise TimeoutError(f"no end of replay from {self._replay_endpoint}")
        finally:
            req.close(linger=0)

    def catch_up(self, timeout_s: float = 2.0) -> None:
        """Fill the gaps since the first batch from the replay socket; a snapshot (the buffer
        no longer holds batch 0) replaces everything up to its number."""
        batches = self.replay(0, timeout_s)
        if batches and batches[0][0] != 0:
            seq, snapshot = batches.pop(0)
            self.batches = {s: b for s, b in self.batches.items() if s > seq}
            self.batches[seq] = snapshot
        self.batches.update(batches)

    def wait_for(self, check: Callable[[list[Any]], bool], what: str,
                 timeout_s: float = 10.0) -> list[Any]:
        """Poll until ``check(events)``; every 0.2 s without success, fill gaps from the
        replay socket (PUB drops what it sends before a subscription takes effect)."""
        deadline = time.monotonic() + timeout_s
        replayed = time.monotonic()
        while time.monotonic() < deadline:
            self.poll()
            events = self.events()
            if check(events):
                return events
            if self._replay_endpoint is not None and time.monotonic() - replayed > 0.2:
                self.catch_up()
                replayed = time.monotonic()
        raise AssertionError(f"timed out waiting for {what}: got {self.events()!r}")

    def close(self) -> None:
        self._sub.close(linger=0)
