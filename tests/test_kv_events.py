"""KV events: a real engine's CPU tier announced over real ZMQ sockets in vLLM's wire format,
decoded here with vLLM's own classes (``vllm.distributed.kv_events``). The LMDB tier's events
are tested in plugins/lmdb_store/tests, a real vLLM engine's in plugins/vllm_connector/tests."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterator

import pytest
import zmq
from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVEventBatch

from kvcore.config import ConfigError
from kvcore.engine import CacheEngine
from kvcore.events.publisher import ChunkLabel, KVEventPublisher
from kvcore.events.subscriber import EventSubscriber
from kvcore.keys import Namespace

CHUNK = 4
PAYLOAD = 256
NS = Namespace("events-model", layout="test", geometry="L2")
PROMPT = list(range(1, 1 + 4 * CHUNK))


@pytest.fixture
def endpoints() -> Iterator[tuple[str, str]]:
    """Two IPC endpoints (unlike two free TCP ports, never the same one twice)."""
    with tempfile.TemporaryDirectory(prefix="kvev-") as sockets:
        yield f"ipc://{sockets}/pub", f"ipc://{sockets}/replay"


@pytest.fixture
def publishing(monkeypatch: pytest.MonkeyPatch, endpoints: tuple[str, str],
               make_engine: Callable[..., CacheEngine]) -> Callable[..., CacheEngine]:
    """``publishing(**settings)``: an engine whose kv_events attachment publishes on
    ``endpoints`` (set through the environment, as a user does)."""
    monkeypatch.setenv("KVCORE_KV_EVENTS_ENDPOINT", endpoints[0])
    monkeypatch.setenv("KVCORE_KV_EVENTS_REPLAY_ENDPOINT", endpoints[1])
    monkeypatch.setenv("KVCORE_KV_EVENTS_FLUSH_S", "0.01")

    def make(**settings: object) -> CacheEngine:
        return make_engine(**{"chunk_size": CHUNK, "cpu_size": "1MiB", **settings})
    return make


@pytest.fixture
def subscriber(endpoints: tuple[str, str]) -> Iterator[EventSubscriber]:
    sub = EventSubscriber(*endpoints, batch_type=KVEventBatch)
    yield sub
    sub.close()


def _store(engine: CacheEngine, tokens: list[int] = PROMPT) -> list[bytes]:
    keys = engine.keys_for(NS, tokens)
    assert engine.store_buffers(keys, [bytes([i]) * PAYLOAD for i in range(len(keys))]).wait(10)
    return keys


def _stored(events: list[object], medium: str = "CPU") -> list[BlockStored]:
    return [e for e in events if isinstance(e, BlockStored) and e.medium == medium]


def _removed(events: list[object], medium: str = "CPU") -> list[list[object]]:
    return [e.block_hashes for e in events if isinstance(e, BlockRemoved) and e.medium == medium]


def test_stores_and_evictions_are_announced_in_vllms_format(
        publishing: Callable[..., CacheEngine], subscriber: EventSubscriber) -> None:
    engine = publishing(cpu_size=6 * PAYLOAD, eviction="lru")
    assert isinstance(engine.attachments["kv_events"], KVEventPublisher)
    first = _store(engine)
    events = subscriber.wait_for(lambda ev: len(_stored(ev)) == 4, "four BlockStored")
    stored = _stored(events)
    assert [s.block_hashes for s in stored] == [[k] for k in first]  # unlabelled: the key
    assert all(s.block_size == CHUNK and s.token_ids == [] for s in stored)
    other = _store(engine, [t + 1000 for t in PROMPT])  # 8 chunks in a 6-chunk tier: 2 evicted
    events = subscriber.wait_for(lambda ev: len(_removed(ev)) == 2, "two BlockRemoved")
    assert _removed(events) == [[first[0]], [first[1]]]  # LRU: the oldest two
    assert [s.block_hashes for s in _stored(events)[4:]] == [[k] for k in other]
    assert engine.delete(other[:1]) == 1
    events = subscriber.wait_for(lambda ev: len(_removed(ev)) == 3, "the delete")
    assert _removed(events)[-1] == [other[0]]
    assert engine.metrics.get("kv_events_published_total") == len(events)


def test_labelled_chunks_carry_the_engines_block_hashes_and_tokens(
        publishing: Callable[..., CacheEngine], subscriber: EventSubscriber) -> None:
    engine = publishing(cpu_size=2 * PAYLOAD, eviction="lru")
    publisher = engine.attachments["kv_events"]
    assert isinstance(publisher, KVEventPublisher)
    keys = engine.keys_for(NS, PROMPT[:2 * CHUNK])
    labels = [ChunkLabel((b"h0", b"h1"), None, tuple(PROMPT[:4]), 2),
              ChunkLabel((b"h2", b"h3"), b"h1", tuple(PROMPT[4:8]), 2, lora_name="adapter")]
    publisher.label(keys, labels)
    _store(engine, PROMPT[:2 * CHUNK])
    stored = _stored(subscriber.wait_for(lambda ev: len(_stored(ev)) == 2, "two BlockStored"))
    assert [(s.block_hashes, s.parent_block_hash, s.token_ids, s.block_size, s.lora_name)
            for s in stored] == [([b"h0", b"h1"], None, PROMPT[:4], 2, None),
                                 ([b"h2", b"h3"], b"h1", PROMPT[4:8], 2, "adapter")]
    _store(engine, PROMPT[2 * CHUNK:])  # evicts both: removed under the hashes announced
    events = subscriber.wait_for(lambda ev: len(_removed(ev)) == 2, "two BlockRemoved")
    assert _removed(events) == [[b"h0", b"h1"], [b"h2", b"h3"]]


def test_a_late_subscriber_resynchronises(monkeypatch: pytest.MonkeyPatch,
                                          publishing: Callable[..., CacheEngine],
                                          endpoints: tuple[str, str]) -> None:
    """Replay from the buffer while it holds the batch asked for; a snapshot of everything
    held (one batch, numbered as the newest) once it does not."""
    monkeypatch.setenv("KVCORE_KV_EVENTS_BUFFER_STEPS", "2")
    engine = publishing(cpu_size=6 * PAYLOAD, eviction="lru")
    keys: list[bytes] = []
    for i in range(5):  # five stores, each published as its own batch
        keys += _store(engine, [t + 100 * i for t in PROMPT[:CHUNK]])
        _wait_published(engine, i + 1)
    late = EventSubscriber(*endpoints, batch_type=KVEventBatch)
    try:
        recent = late.replay(3)
        assert [seq for seq, _ in recent] == [3, 4]
        assert [e.block_hashes for _, b in recent for e in b.events] == [[keys[3]], [keys[4]]]
        (snapshot, *rest) = late.replay(0)  # batch 0 is gone from the 2-batch buffer
        assert snapshot[0] == 4 and [seq for seq, _ in rest] == []
        assert sorted(e.block_hashes[0] for e in snapshot[1].events) == sorted(keys)
        assert {e.medium for e in snapshot[1].events} == {"CPU"}
    finally:
        late.close()


def _wait_published(engine: CacheEngine, events: int) -> None:
    deadline = time.monotonic() + 10
    while engine.metrics.get("kv_events_published_total") < events:
        assert time.monotonic() < deadline, "events not published"
        time.sleep(0.01)


def test_garbage_on_the_replay_socket_is_ignored(publishing: Callable[..., CacheEngine],
                                                 endpoints: tuple[str, str],
                                                 subscriber: EventSubscriber) -> None:
    engine = publishing()
    ctx = zmq.Context.instance()
    for frames in ([b"", b"short"], [b"", b"x" * 8, b"extra"], [b"no-delimiter" * 8],
                   [b"", b"y" * 2000]):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoints[1])
        sock.send_multipart(frames)
        assert not sock.poll(200), f"{frames!r} got an answer"
        sock.close(linger=0)
    keys = _store(engine)
    subscriber.wait_for(lambda ev: len(_stored(ev)) == len(keys), "the stores")
    assert engine.metrics.get("kv_events_bad_replays_total") >= 2


def test_remembered_chunks_are_bounded(monkeypatch: pytest.MonkeyPatch,
                                       publishing: Callable[..., CacheEngine],
                                       subscriber: EventSubscriber) -> None:
    """Beyond KVCORE_KV_EVENTS_MAX_CHUNKS the oldest chunk is announced removed (a router
    under-counts rather than routes to a chunk kvcore could not announce the removal of)."""
    monkeypatch.setenv("KVCORE_KV_EVENTS_MAX_CHUNKS", "3")
    engine = publishing()
    keys = _store(engine)
    events = subscriber.wait_for(lambda ev: len(_removed(ev)) == 1, "the oldest forgotten")
    assert _removed(events) == [[keys[0]]] and len(_stored(events)) == 4
    assert len(engine.attachments["kv_events"]._published) == 3


def test_an_endpoint_in_use_leaves_the_engine_running_without_events(
        publishing: Callable[..., CacheEngine], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch, free_port: Callable[[], int]) -> None:
    # TCP: a second bind of an IPC path succeeds (it takes the path over)
    monkeypatch.setenv("KVCORE_KV_EVENTS_ENDPOINT", f"tcp://127.0.0.1:{free_port()}")
    monkeypatch.delenv("KVCORE_KV_EVENTS_REPLAY_ENDPOINT")
    first = publishing()
    with caplog.at_level(logging.WARNING, logger="kvcore.attachments"):
        second = publishing()
    assert "kv_events" in first.attachments and "kv_events" not in second.attachments
    assert any("kv_events failed to start" in r.getMessage() for r in caplog.records)
    assert second.lookup(_store(second)).tokens == 4 * CHUNK


def test_a_bad_endpoint_names_the_setting(monkeypatch: pytest.MonkeyPatch,
                                          make_engine: Callable[..., CacheEngine]) -> None:
    monkeypatch.setenv("KVCORE_KV_EVENTS_ENDPOINT", "127.0.0.1:5557")
    with pytest.raises(ConfigError, match="KVCORE_KV_EVENTS_ENDPOINT='127.0.0.1:5557'.*tcp://"):
        make_engine(chunk_size=CHUNK)
