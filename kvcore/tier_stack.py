"""The synchronous tier stack: where each chunk is, promotion into memory, delete, pin, clear,
stats.

The memory tier comes first; every tier below it is wrapped in a :class:`LowerTier`, which
bounds each call by ``KVCORE_TIER_TIMEOUT_S``, frames values on the way down and verifies them
on the way up (a corrupted or foreign value is a miss and is deleted), and turns every failure
into a miss through one :class:`~kvcore.failures.FailureLog`. Nothing here starts a thread of
its own beyond each lower tier's call pool: the asynchronous work lives in
:mod:`kvcore.pipeline`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from kvcore import chunk_format
from kvcore.background import lower_priority
from kvcore.codecs.context import CodecContext
from kvcore.failures import FailureLog
from kvcore.interfaces import Buffer, Codec, MemoryTier, Tier
from kvcore.keys import ChunkKey, Namespace, key_namespace
from kvcore.metrics import Metrics
from kvcore.misses import ChunkHistory
from kvcore.planner import TierCost

log = logging.getLogger("kvcore.engine")


MAX_UNREADABLE = 4096
MAX_EXPANSION = 256
"""An encoded chunk may claim at most this many raw bytes per stored byte (KV compresses to
half with int8, a quarter with int4, two thirds losslessly; this bound only stops a small
value from making a decoder allocate gigabytes)."""


class UnknownCodec(LookupError):
    """A chunk encoded by a codec this process does not have: a miss, but kept."""


class LowerTier:
    """A tier below memory, with bounded waits, framing (and the tier's codec), and
    once-per-kind error logging."""

    def __init__(self, tier: Tier, timeout_s: float, metrics: Metrics, nice: int = 0,
                 codec: Codec | None = None, codecs: CodecContext | None = None,
                 max_raw_bytes: int = chunk_format.MAX_CODED_RAW_BYTES,
                 history: ChunkHistory | None = None, cost: TierCost | None = None) -> None:
        """``codec`` encodes what this tier stores (``None``: raw); ``codecs`` decodes what it
        holds (any registered codec) and knows each namespace's element type;
        ``max_raw_bytes`` bounds the raw size an encoded frame may claim (the memory budget);
        ``history`` is told what this tier stored and what failed verification; ``cost``
        times every read (the planner's model of this tier)."""
        self.tier = tier
        self.name = tier.name
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.codec = codec if tier.framed else None
        self.codecs = codecs
        self.max_raw_bytes = max_raw_bytes
        self.history = history
        self.cost = cost
        self.timeouts = 0
        """Calls that did not answer within the timeout (a load that ran late)."""
        self._unreadable: OrderedDict[bytes, None] = OrderedDict()
        """Keys held in a codec not installed here (bounded): misses, not hits, to lookups."""
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"kvcore-{tier.name}",
                                        initializer=lower_priority, initargs=(nice,))
        self.failures = FailureLog(log, "treated as a miss", prefix=f"kvcore tier {tier.name}: ",
                                   metrics=metrics, counter="tier_errors_total", label=tier.name)

    def call(self, what: str, fn: Callable[..., Any], *args: Any, default: Any) -> Any:
        """``fn(*args)`` in this tier's pool, waiting at most the tier timeout; ``default``
        (recorded) when it raises or does not answer in time."""
        started = time.perf_counter()
        try:
            result = self._pool.submit(fn, *args).result(timeout=self.timeout_s)
        except FutureTimeout:
            self.timeouts += 1
            self.failures.record(what, f"no answer within {self.timeout_s}s")
            return default
        except Exception as exc:  # noqa: BLE001 - a tier's failure is a miss, never an error
            self.failures.record(what, exc)
            return default
        self.metrics.observe(f"tier_{what}_seconds", time.perf_counter() - started, self.name)
        return result

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        found = self.call("contains", self.tier.contains, list(keys), default=None)
        if found is None or len(found) != len(keys):
            return [False] * len(keys)
        with self._lock:
            return [bool(hit) and bytes(key) not in self._unreadable
                    for key, hit in zip(keys, found)]

    def get_decoded(self, keys: Sequence[ChunkKey]) -> list[tuple[memoryview, str] | None]:
        """Raw payloads of ``keys`` with the codec each was stored with (None for a miss).
        A value that fails its checksum or does not decode is deleted; one written with a
        codec unknown here is a miss but kept (an engine that has the codec can read it)."""
        if self.cost is None:
            return self._get_decoded(keys)
        started = time.perf_counter()
        self.cost.started(len(keys))
        try:
            return self._get_decoded(keys)
        finally:  # framing, verification and decoding included: what a load waits for
            self.cost.finished(len(keys), time.perf_counter() - started)

    def _get_decoded(self, keys: Sequence[ChunkKey]) -> list[tuple[memoryview, str] | None]:
        values = self.call("get", self.tier.get, list(keys), default=None)
        if values is None or len(values) != len(keys):
            return [None] * len(keys)
        out: list[tuple[memoryview, str] | None] = []
        corrupt: list[ChunkKey] = []
        for key, value in zip(keys, values):
            try:
                found = self._payload(key, value) if value is not None else None
            except UnknownCodec as exc:
                self.failures.record("decode", exc)
                with self._lock:  # a miss for this engine from now on, kept for the others
                    self._unreadable[bytes(key)] = None
                    while len(self._unreadable) > MAX_UNREADABLE:
                        self._unreadable.popitem(last=False)
                found = value = None
            if value is not None and found is None:
                corrupt.append(key)
            if found is not None:
                self.metrics.inc("bytes_loaded_total", found[0].nbytes, self.name)
            out.append(found)
        if corrupt:
            self.metrics.inc("corrupt_chunks_total", len(corrupt), self.name)
            self.failures.record("verify", f"{len(corrupt)} corrupted or foreign chunk(s) removed")
            self.call("delete", self.tier.delete, corrupt, default=0)
            if self.history is not None:
                self.history.note(self.name, "corrupt", corrupt)
        return out

    def get_verified(self, keys: Sequence[ChunkKey]) -> list[memoryview | None]:
        """Raw payloads of ``keys`` (None for a miss), as :meth:`get_decoded`."""
        return [found[0] if found is not None else None for found in self.get_decoded(keys)]

    def _payload(self, key: ChunkKey, value: Buffer) -> tuple[memoryview, str] | None:
        """The raw payload of one stored value and its codec; None when it is not intact."""
        if not self.tier.framed:
            return memoryview(value).cast("B"), chunk_format.RAW_CODEC
        frame = chunk_format.open_frame(key, value)
        if frame is None:
            return None
        if frame.codec == chunk_format.RAW_CODEC:
            return frame.data, frame.codec
        codec = self.codecs.by_name(frame.codec) if self.codecs is not None else None
        if codec is None:
            raise UnknownCodec(f"codec {frame.codec!r} is not installed here")
        if frame.raw_nbytes > min(self.max_raw_bytes, MAX_EXPANSION * frame.data.nbytes):
            return None  # bounded before the decoder allocates it
        started = time.perf_counter()
        try:
            raw = memoryview(codec.decode(frame.data, frame.raw_nbytes)).cast("B")
        except Exception as exc:  # noqa: BLE001 - data that does not decode is corrupt
            self.failures.record("decode", exc)
            return None
        self.metrics.observe("codec_decode_seconds", time.perf_counter() - started, frame.codec)
        return (raw, frame.codec) if raw.nbytes == frame.raw_nbytes else None

    def _frame(self, key: ChunkKey, view: memoryview, tokens: int) -> list[Buffer]:
        """The stored form of one raw payload: encoded with this tier's codec when the chunk's
        element type is known and the codec makes it smaller, else raw."""
        if not self.tier.framed:
            return [view]
        dtype = self.codecs.dtype_of(key) if self.codecs is not None else None
        if self.codec is None or dtype is None or view.nbytes > chunk_format.MAX_CODED_RAW_BYTES:
            return chunk_format.encode(key, view, tokens)
        started = time.perf_counter()
        try:
            encoded = self.codec.encode(view, dtype)
        except Exception as exc:  # noqa: BLE001 - a codec's failure stores the chunk raw
            self.failures.record("encode", exc)
            encoded = None
        self.metrics.observe("codec_encode_seconds", time.perf_counter() - started,
                             self.codec.name)
        if encoded is None or memoryview(encoded).nbytes >= view.nbytes:
            return chunk_format.encode(key, view, tokens)
        return chunk_format.encode_coded(key, self.codec.name, encoded, view.nbytes, tokens)

    def put(self, items: Sequence[tuple[ChunkKey, memoryview]], tokens: int) -> int:
        """Store payloads (framed and encoded for this tier); return how many it accepted."""
        framed = [(key, self._frame(key, view, tokens)) for key, view in items]
        stored = self.call("put", self.tier.put, framed, default=None)
        accepted = [(v, parts) for (_, v), (_, parts), ok in zip(items, framed, stored or [])
                    if ok]
        if self._unreadable:
            with self._lock:  # rewritten by this engine: readable here again
                for (key, _), ok in zip(items, stored or []):
                    if ok:
                        self._unreadable.pop(bytes(key), None)
        if self.history is not None:
            self.history.note(self.name, "stored",
                              [key for (key, _), ok in zip(items, stored or []) if ok])
        self.metrics.inc("bytes_stored_total", sum(v.nbytes for v, _ in accepted), self.name)
        self.metrics.inc("bytes_written_total",
                         sum(memoryview(p).nbytes for _, parts in accepted for p in parts),
                         self.name)
        return len(accepted)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        try:
            self.tier.close()
        except Exception as exc:  # noqa: BLE001 - closing the others matters more
            log.warning("kvcore tier %s: close failed: %s", self.name, exc)


class TierStack:
    """The memory tier and the lower tiers below it, asked fastest first."""

    def __init__(self, memory: MemoryTier, lower: list[LowerTier], metrics: Metrics,
                 codecs: CodecContext | None = None,
                 history: ChunkHistory | None = None) -> None:
        self.memory = memory
        self.lower = lower
        self.metrics = metrics
        self.codecs = codecs
        self.history = history
        """Told of every delete and clear (the reason a later lookup misses)."""

    def _deleted(self, tier: str, keys: Sequence[ChunkKey]) -> None:
        if self.history is not None:
            self.history.note(tier, "deleted", keys)

    @property
    def tiers(self) -> list[Tier]:
        return [self.memory, *(t.tier for t in self.lower)]

    def locate(self, keys: Sequence[ChunkKey]) -> list[str | None]:
        """For each key, the first tier (fastest first) that holds it; ``None`` where none
        does. Lower tiers are asked only about chunks after the first one memory misses."""
        source = self.memory.locate(keys)
        if len(source) != len(keys):
            source = [None] * len(keys)
        first_gap = next((i for i, s in enumerate(source) if s is None), len(keys))
        missing = [i for i in range(first_gap, len(keys)) if source[i] is None]
        for tier in self.lower:
            if not missing:
                break
            hits = tier.contains([keys[i] for i in missing])
            for i, hit in zip(missing, hits):
                if hit:
                    source[i] = tier.name
            missing = [i for i, hit in zip(missing, hits) if not hit]
        return source

    def timeouts(self) -> int:
        """Lower-tier calls that ran out of time so far."""
        return sum(t.timeouts for t in self.lower)

    def promote(self, keys: list[ChunkKey], parents: dict[ChunkKey, ChunkKey | None]) -> int:
        """Read ``keys`` missing from memory from the lower tiers (verified) into memory."""
        missing = [k for k, hit in zip(keys, self.memory.contains(keys)) if not hit]
        promoted = 0
        for tier in self.lower:
            if not missing:
                break
            found = tier.get_decoded(missing)
            still = []
            for key, item in zip(missing, found):
                if item is None:
                    still.append(key)
                    continue
                if self.codecs is not None:
                    self.codecs.note_loaded(key, item[1])  # before readers can see it
                if self.memory.put_one(key, [item[0]], parents.get(key)):
                    promoted += 1
                    self.metrics.inc("promoted_chunks_total", label=tier.name)
                elif self.codecs is not None:
                    self.codecs.forget([key])  # not ours: what memory holds is a fresh store
            missing = still
        return promoted

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        """Remove chunks from every tier; return how many copies were removed."""
        keys = list(keys)
        removed = self.memory.delete(keys)
        for tier in self.lower:
            removed += tier.call("delete", tier.tier.delete, keys, default=0)
        for name in [self.memory.name, *(t.name for t in self.lower)]:
            self._deleted(name, keys)
        return removed

    def pin(self, keys: Sequence[ChunkKey]) -> int:
        keys = list(keys)
        return self.memory.pin(keys) + sum(
            t.call("pin", t.tier.pin, keys, default=0) for t in self.lower)

    def unpin(self, keys: Sequence[ChunkKey]) -> int:
        keys = list(keys)
        return self.memory.unpin(keys) + sum(
            t.call("unpin", t.tier.unpin, keys, default=0) for t in self.lower)

    def clear(self, namespace: Namespace | bytes | None = None, tier: str | None = None) -> int:
        """Remove every chunk (of one namespace, in one tier, when given)."""
        ns = namespace.digest if isinstance(namespace, Namespace) else namespace
        removed = 0
        if self.memory.below and (tier is None or tier == self.memory.name
                                  or tier in self.memory.below):
            removed += self.memory.clear_below(ns, tier)  # its owner notes what it removed
        elif tier is None or tier == self.memory.name:
            keys = [k for k in self.memory.iter_keys() if ns is None or key_namespace(k) == ns]
            self.memory.unpin(keys)
            removed += self.memory.delete(keys)
            self._deleted(self.memory.name, keys)
        for lower in self.lower:
            if tier is not None and lower.name != tier:
                continue
            keys = [k for k in lower.tier.iter_keys() if ns is None or key_namespace(k) == ns]
            removed += lower.call("delete", lower.tier.delete, keys, default=0)
            self._deleted(lower.name, keys)
        return removed

    def usage(self) -> dict[str, Any]:
        """Each tier's usage; a lower tier's is read with the same bounded wait as every other
        lower-tier call (a tier that does not answer reports an error)."""
        tiers: dict[str, Any] = {}
        sources: list[MemoryTier | LowerTier] = [self.memory, *self.lower]
        for t in sources:
            try:
                if isinstance(t, LowerTier):
                    u = t.call("usage", t.tier.usage, default=None)
                    if u is None:
                        tiers[t.name] = {"error": f"no usage within {t.timeout_s}s"}
                        continue
                else:
                    u = t.usage()
                tiers[t.name] = {"used_bytes": u.used_bytes, "budget_bytes": u.budget_bytes,
                                 "chunks": u.chunks}
            except Exception as exc:  # noqa: BLE001 - stats report a broken tier, never raise
                tiers[t.name] = {"error": str(exc)}
        return tiers

    def close(self) -> None:
        for tier in self.lower:
            tier.close()
        try:
            self.memory.close()  # the cache server's: its lease ends now, its threads stop
        except Exception as exc:  # noqa: BLE001 - closing is best effort
            log.warning("kvcore tier %s: close failed: %s", self.memory.name, exc)
