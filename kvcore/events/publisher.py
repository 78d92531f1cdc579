"""The ``kv_events`` attachment: kvcore's tiers announced to cache-aware routers in vLLM's KV
event format (docs/kv-events.md).

Every admission into a tier is a ``BlockStored`` with that tier's medium, every eviction or
delete a ``BlockRemoved``. A chunk is announced under the block hashes the engine itself uses for
its tokens when a connector told them ahead (:meth:`KVEventPublisher.label`: the vLLM
connector passes vLLM's block hashes), so a router that indexes the engine's own events finds
kvcore's copies under the same hashes; otherwise under the kvcore chunk key, one block of a
chunk's tokens. One thread owns both sockets: PUB for the live stream, and an optional ROUTER
for replays (a subscriber that joins late or lost messages sends the first sequence number it
wants and gets the buffered batches from there, then an end marker; if that batch has left the
buffer it gets a snapshot batch, announcing every chunk held, numbered as the newest batch).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import zmq

from kvcore.events import wire
from kvcore.events.settings import KVEventSettings
from kvcore.interfaces import Attachment
from kvcore.keys import ChunkKey

if TYPE_CHECKING:
    from kvcore.engine import CacheEngine

log = logging.getLogger("kvcore.events")

MAX_EVENTS_PER_BATCH = 1024
"""Events in one published batch (a large eviction is sent as several)."""


@dataclass(frozen=True)
class ChunkLabel:
    """How the engine names one chunk's blocks: its block hashes (in order), the hash of the
    block before them (``None`` at the start of a prompt), the chunk's token ids and the
    engine's block size."""

    block_hashes: tuple[wire.BlockHash, ...]
    parent_block_hash: wire.BlockHash | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_name: str | None = None


@dataclass
class _Published:
    """What was announced for one chunk: under which hashes, and in which tiers it is."""

    hashes: list[wire.BlockHash]
    tiers: set[str]


class KVEventPublisher(Attachment):
    """See the module docstring. Thread-safe: tiers notify from any thread."""

    def __init__(self, engine: CacheEngine, settings: KVEventSettings,
                 context: zmq.Context[zmq.Socket[bytes]] | None = None) -> None:
        self.settings = settings
        self._chunk_tokens = engine.chunk_size
        self._metrics = engine.metrics
        self._labels: OrderedDict[ChunkKey, ChunkLabel] = OrderedDict()
        self._labels_lock = threading.Lock()
        self._published: OrderedDict[ChunkKey, _Published] = OrderedDict()
        self._queue: queue.Queue[tuple[str, str, list[ChunkKey]]] = queue.Queue(
            settings.queue_size)
        self._buffer: OrderedDict[int, bytes] = OrderedDict()
        self._seq = -1
        self._ctx = context or zmq.Context.instance()
        self._pub = self._ctx.socket(zmq.PUB)
        self._replay: zmq.Socket[bytes] | None = None
        try:
            self._pub.setsockopt(zmq.LINGER, 0)
            self._pub.bind(settings.endpoint)
            if settings.replay_endpoint:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.setsockopt(zmq.LINGER, 0)
                self._replay.setsockopt(zmq.MAXMSGSIZE, 1024)  # a replay request is 8 bytes
                self._replay.bind(settings.replay_endpoint)
        except zmq.ZMQError:
            self._close_sockets()
            raise
        self._topic = settings.topic.encode()
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kvcore-kv-events", daemon=True)
        self._thread.start()
        engine.subscribe(self._on_tier_event)
        log.info("kvcore KV events: publishing on %s%s", settings.endpoint,
                 f", replay on {settings.replay_endpoint}" if self._replay is not None else "")

    # -- what connectors and tiers tell it ---------------------------------------------------------

    def label(self, keys: Sequence[ChunkKey], labels: Sequence[ChunkLabel]) -> None:
        """Tell how the engine names each key's blocks, ahead of their store (bounded: the
        oldest labels are forgotten first)."""
        with self._labels_lock:
            for key, label in zip(keys, labels):
                self._labels[key] = label
                self._labels.move_to_end(key)
            while len(self._labels) > self.settings.max_labels:
                self._labels.popitem(last=False)

    def _on_tier_event(self, tier: str, kind: str, keys: list[ChunkKey]) -> None:
        if self._closed:
            return
        try:
            self._queue.put_nowait((tier, kind, list(keys)))
        except queue.Full:
            self._metrics.inc("kv_events_dropped_total", len(keys))

    # -- the publisher thread --------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        if self._replay is not None:
            poller.register(self._replay, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                if self._replay is not None:
                    if dict(poller.poll(round(self.settings.flush_s * 1000))):
                        self._serve_replay()
                else:
                    self._stop.wait(self.settings.flush_s)
                self._publish_pending()
            except Exception as exc:  # noqa: BLE001 - the publisher never stops on one failure
                self._metrics.inc("kv_events_errors_total")
                log.warning("kvcore KV events: %s: %s", type(exc).__name__, exc)
        self._publish_pending()

    def _publish_pending(self) -> None:
        events: list[wire.Event] = []
        while True:
            try:
                tier, kind, keys = self._queue.get_nowait()
            except queue.Empty:
                break
            events.extend(self._events_for(tier, kind, keys))
        for start in range(0, len(events), MAX_EVENTS_PER_BATCH):
            self._send(events[start:start + MAX_EVENTS_PER_BATCH])

    def _events_for(self, tier: str, kind: str, keys: list[ChunkKey]) -> list[wire.Event]:
        medium = wire.medium_of(tier)
        events: list[wire.Event] = []
        for key in keys:
            held = self._published.get(key)
            if kind == "admit":
                if held is not None and tier in held.tiers:
                    continue
                label = self._label_of(key)
                if held is None:
                    held = self._published[key] = _Published(list(label.block_hashes), set())
                held.tiers.add(tier)
                self._published.move_to_end(key)
                events.append(self._stored(held.hashes, label, medium))
            elif held is not None and tier in held.tiers:
                held.tiers.discard(tier)
                if not held.tiers:
                    del self._published[key]
                events.append(wire.BlockRemoved(held.hashes, medium))
        while len(self._published) > self.settings.max_chunks:  # forget the oldest, announced
            _, oldest = self._published.popitem(last=False)
            events.extend(wire.BlockRemoved(oldest.hashes, wire.medium_of(t))
                          for t in sorted(oldest.tiers))
        return events

    def _label_of(self, key: ChunkKey) -> ChunkLabel:
        with self._labels_lock:
            label = self._labels.get(key)
        if label is not None:
            return label
        return ChunkLabel((bytes(key),), None, (), self._chunk_tokens)

    @staticmethod
    def _stored(hashes: list[wire.BlockHash], label: ChunkLabel, medium: str) -> wire.BlockStored:
        return wire.BlockStored(list(hashes), label.parent_block_hash, list(label.token_ids),
                                label.block_size, None, medium, label.lora_name)

    def _send(self, events: list[wire.Event]) -> None:
        payload = wire.encode(wire.EventBatch(time.time(), events))
        self._seq += 1
        self._buffer[self._seq] = payload
        while len(self._buffer) > self.settings.buffer_steps:
            self._buffer.popitem(last=False)
        self._metrics.inc("kv_events_published_total", len(events))
        self._pub.send_multipart((self._topic, self._seq.to_bytes(8, "big"), payload))

    def _serve_replay(self) -> None:
        """Answer one replay request ``[identity, b"", start_seq]``; anything else is dropped."""
        assert self._replay is not None
        frames = self._replay.recv_multipart(zmq.NOBLOCK)
        if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
            self._metrics.inc("kv_events_bad_replays_total")
            return
        client, start = frames[0], int.from_bytes(frames[2], "big")
        oldest = next(iter(self._buffer), self._seq + 1)
        if start < oldest and self._published:  # gone from the buffer: a snapshot instead
            snapshot: list[wire.Event] = []
            for key, held in self._published.items():
                label = self._label_of(key)
                snapshot.extend(self._stored(held.hashes, label, wire.medium_of(t))
                                for t in sorted(held.tiers))
            payload = wire.encode(wire.EventBatch(time.time(), snapshot))
            self._replay.send_multipart((client, b"", self._topic,
                                         max(self._seq, 0).to_bytes(8, "big"), payload))
            start = self._seq + 1
        for seq, payload in self._buffer.items():
            if seq >= start:
                self._replay.send_multipart((client, b"", self._topic, seq.to_bytes(8, "big"),
                                             payload))
        self._replay.send_multipart((client, b"", b"", wire.END_SEQ, b""))

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._close_sockets()

    def _close_sockets(self) -> None:
        for sock in (self._pub, self._replay):
            if sock is not None:
                sock.close(linger=0)
