"""The small interfaces that plugins implement: the memory tier, storage tiers, eviction
policies, and attachments that run beside an engine.

Each is registered by name through a hook in :mod:`kvcore.hookspecs`. ``docs/plugins.md``
walks through writing one; :mod:`kvcore.testing` holds the contract tests every implementation
must pass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from kvcore.keys import ChunkKey

if TYPE_CHECKING:
    from kvcore.config import Settings
    from kvcore.engine import CacheEngine

Buffer = bytes | bytearray | memoryview
"""Anything exposing the buffer protocol as bytes."""


@dataclass
class TierUsage:
    """How full a tier is."""

    used_bytes: int
    budget_bytes: int
    chunks: int


@dataclass
class TierContext:
    """What a tier factory gets: the core settings, the eviction policy to use, and (for tiers
    below memory) the engine's memory tier."""

    name: str
    settings: Settings
    make_policy: Callable[[], EvictionPolicy]
    notify: Callable[[str, str, list[ChunkKey]], None] | None = None
    """Optional: tiers report ``notify(tier_name, "admit" | "evict", keys)`` for observers."""
    memory: MemoryTier | None = None
    """The engine's memory tier (None while the memory tier itself is built), for a lower tier
    that sizes what it reads by the memory budget (kvcore-nixl)."""


class Tier(ABC):
    """A storage tier: a byte-budgeted map from chunk key to an opaque value.

    Tiers below the first receive *framed* values (a header with a checksum, then the payload,
    see :mod:`kvcore.chunk_format`): the engine frames on put and verifies on get, so a tier
    needs no integrity code of its own and a corrupted value becomes a miss. A tier keeps itself
    within its byte budget, choosing victims with the policy from its :class:`TierContext`.

    Every method is called from engine worker threads and must be thread-safe. A method may
    raise: the engine turns any exception into a miss (or a dropped store) and logs it.
    """

    name: str = "tier"
    framed: bool = True
    """True when the engine should frame values (every tier except in-process memory)."""
    codec: str = "none"
    """The codec the engine encodes this tier's chunks with (a name registered through
    ``kvcore_register_codecs``; ``"none"`` stores raw bytes). Tiers set it from their settings,
    for example ``KVCORE_LMDB_CODEC``."""
    _notify: Callable[[str, str, list[ChunkKey]], None] | None = None
    """Observer from :attr:`TierContext.notify`; a tier that sets it reports through
    :meth:`_emit`."""
    reported: bool = True
    """False for a tier another process owns and reports to the controller (the cache
    server's): this engine's reporter leaves its keys out."""

    def _emit(self, kind: str, keys: list[ChunkKey]) -> None:
        """Report ``"admit"``, ``"evict"`` or ``"corrupt"`` (removed after failing the tier's
        own verification) of ``keys``; an observer's failure is ignored."""
        if keys and self._notify is not None:
            try:
                self._notify(self.name, kind, keys)
            except Exception:  # noqa: BLE001 - an observer never fails the tier
                pass

    @abstractmethod
    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """For each key, whether the tier holds it. Moves no data."""

    @abstractmethod
    def get(self, keys: Sequence[ChunkKey]) -> list[Buffer | None]:
        """Values for ``keys`` (``None`` for a miss)."""

    @abstractmethod
    def put(self, items: Sequence[tuple[ChunkKey, Sequence[Buffer]]]) -> list[bool]:
        """Store each value, given as parts to be concatenated; True where it was stored.

        A tier may refuse a value (too large, admission policy, out of space) by returning False.
        """

    @abstractmethod
    def delete(self, keys: Sequence[ChunkKey]) -> int:
        """Remove keys; return how many were present."""

    @abstractmethod
    def usage(self) -> TierUsage:
        """Bytes used, byte budget, number of chunks."""

    def iter_keys(self) -> Iterator[ChunkKey]:
        """Every key the tier holds (used to clear a namespace). Optional."""
        return iter(())

    def pin(self, keys: Sequence[ChunkKey]) -> int:
        """Exempt keys from eviction; return how many were present. Optional."""
        return 0

    def unpin(self, keys: Sequence[ChunkKey]) -> int:
        """Make pinned keys evictable again. Optional."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release resources. Called once when the engine closes."""


class MemoryTier(Tier):
    r"""The first tier of every engine: host memory the engine copies KV into and out of.

    Beside the :class:`Tier` methods it offers zero-copy access: a writer :meth:`reserve`\ s a
    buffer, fills it in place (one batched gather) and :meth:`commit`\ s it; a reader
    :meth:`acquire`\ s read-only views that stay valid (never evicted) until :meth:`release`.
    Values are raw payloads (``framed = False``): the bytes never leave the process unverified,
    and every path out of it (lower tiers, peers) frames or checks them. :class:`CpuTier
    <kvcore.tiers.cpu.CpuTier>` is the in-process implementation; another (shared memory served
    to several engines) stands in through the same methods.
    """

    framed = False
    shared = False
    """Engines in other processes see what this tier holds (the cache server's tier): a vLLM
    scheduler whose worker runs in another process looks chunks up in it directly."""
    budget: int
    """The byte budget."""

    @abstractmethod
    def reserve(self, key: ChunkKey, nbytes: int,
                parent: ChunkKey | None = None) -> np.ndarray | None:
        """A writable uint8 buffer of ``nbytes`` for ``key`` (held by the writer), or ``None``
        when the key is present, the value cannot fit, or admission refuses it."""

    def reserve_many(self, keys: Sequence[ChunkKey], nbytes: int,
                     parents: Sequence[ChunkKey | None]) -> list[np.ndarray | None]:
        """:meth:`reserve` for each key (``nbytes`` each, ``parents[i]`` its parent); a tier
        that pays a round trip per call (the cache server) does them in one."""
        return [self.reserve(key, nbytes, parent) for key, parent in zip(keys, parents)]

    @abstractmethod
    def commit(self, key: ChunkKey) -> None:
        """Make a reserved chunk visible to readers (and evictable)."""

    @abstractmethod
    def abort(self, key: ChunkKey) -> None:
        """Give back a reservation that will not be committed."""

    @abstractmethod
    def acquire(self, keys: Sequence[ChunkKey]) -> list[memoryview | None]:
        """Read-only views of the chunks held (``None`` for a miss); each view's chunk is held
        until :meth:`release`."""

    @abstractmethod
    def release(self, views: Sequence[memoryview | None]) -> None:
        """End the holds of views :meth:`acquire` returned. ``None`` entries, views this tier
        did not hand out and views already released are ignored: a caller can only end its
        own holds, once."""

    def put_one(self, key: ChunkKey, parts: Sequence[Buffer],
                parent: ChunkKey | None = None) -> bool:
        """Copy one value (its parts concatenated) in; False where it was not stored."""
        views = [memoryview(part).cast("B") for part in parts]
        buf = self.reserve(key, sum(v.nbytes for v in views), parent)
        if buf is None:
            return False
        offset = 0
        for view in views:
            buf[offset : offset + view.nbytes] = np.frombuffer(view, dtype=np.uint8)
            offset += view.nbytes
        self.commit(key)
        return True

    def put(self, items: Sequence[tuple[ChunkKey, Sequence[Buffer]]]) -> list[bool]:
        return [self.put_one(key, parts) for key, parts in items]

    def get(self, keys: Sequence[ChunkKey]) -> list[Buffer | None]:
        """Copies of the chunks held (through :meth:`acquire` and :meth:`release`)."""
        views = self.acquire(keys)
        try:
            return [bytes(v) if v is not None else None for v in views]
        finally:
            self.release(views)

    @abstractmethod
    def touch(self, keys: Sequence[ChunkKey]) -> None:
        """Report a hit on each chunk held (for the eviction policy)."""

    # A memory tier may front tiers of its own that another process owns (the cache server's
    # lower tiers): it then names them in ``below`` and overrides the three methods after it.
    below: tuple[str, ...] = ()
    """Names of the tiers this memory tier fronts (none: the engine's own tiers follow it)."""

    def locate(self, keys: Sequence[ChunkKey]) -> list[str | None]:
        """For each key, the name of the tier holding it (this one, or one of :attr:`below`);
        ``None`` where none does. Moves no data."""
        return [self.name if hit else None for hit in self.contains(keys)]

    def fill(self, keys: Sequence[ChunkKey], parents: Sequence[ChunkKey | None],
             timeout_s: float) -> int:
        """Bring ``keys`` that only the tiers :attr:`below` hold into this one, waiting at most
        ``timeout_s``; how many chunks it brought."""
        return 0

    def flush(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until the write-behind of the tiers :attr:`below` is
        done; False when it was not."""
        return True

    def clear_below(self, namespace: bytes | None, tier: str | None) -> int:
        """Remove every chunk (of ``namespace``, in ``tier``: this one or one of
        :attr:`below`; ``None``: all of them); how many copies were removed."""
        return 0


class EvictionPolicy(ABC):
    """Chooses which chunk a tier drops when it needs room.

    The tier reports every insert, hit and removal; it asks for one victim at a time and
    removes it (then calls :meth:`remove`). Pinned chunks are never reported to the policy.
    Implementations need not be thread-safe: the tier calls them under its lock.
    """

    name: str = "policy"

    @abstractmethod
    def insert(self, key: ChunkKey, size: int, parent: ChunkKey | None) -> None:
        """A chunk was stored; ``parent`` is the chunk before it in its prefix, if any."""

    @abstractmethod
    def touch(self, key: ChunkKey) -> None:
        """A chunk was hit (looked up or read)."""

    @abstractmethod
    def remove(self, key: ChunkKey) -> None:
        """A chunk left the tier (evicted, deleted or pinned). Unknown keys are ignored."""

    @abstractmethod
    def victim(self, exclude: Container[ChunkKey] = ()) -> ChunkKey | None:
        """The chunk to evict next, skipping ``exclude``; ``None`` when nothing is evictable."""

    def admit(self, key: ChunkKey, size: int, parent: ChunkKey | None) -> bool:
        """Whether a new chunk should be stored at all (admission control). Default: yes."""
        return True

    def __len__(self) -> int:
        return 0


class CodecError(ValueError):
    """Encoded bytes that do not decode (truncated, foreign, out of bounds): the chunk is a
    miss."""


class Codec(ABC):
    """Turns a chunk's raw KV bytes into fewer bytes for a tier below memory, and back.

    The engine frames what :meth:`encode` returns (the frame records the codec's name and the
    raw length, and its checksum covers the encoded bytes) and calls :meth:`decode` only on
    bytes whose checksum verified. A lossy codec's decoded bytes differ from the raw ones; it
    must say so (:attr:`lossy`), and ``decode(encode(x))`` must be deterministic, so a verifier
    can compare a loaded chunk with the codec applied to freshly computed KV. Thread-safe.
    """

    name: str = "codec"
    lossy: bool = False

    @abstractmethod
    def encode(self, raw: memoryview, dtype: str) -> Buffer | None:
        """The encoded form of ``raw`` (KV elements of ``dtype``, such as ``"bfloat16"``), or
        ``None`` when this codec does not apply (an unsupported dtype, no gain): the chunk is
        then stored raw."""

    @abstractmethod
    def decode(self, encoded: memoryview, raw_nbytes: int) -> Buffer:
        """The ``raw_nbytes`` bytes ``encoded`` stands for; :class:`CodecError` when it does
        not decode to exactly that many. ``encoded`` is untrusted until it decodes: bound every
        size it declares before allocating."""


CodecFactory = Callable[[], Codec]
"""``factory()``: a codec instance (registered through ``kvcore_register_codecs``)."""


@dataclass
class ConnectorInfo:
    """An engine connector a plugin provides (used by ``kvcore plugins``)."""

    name: str
    engine: str
    import_path: str
    description: str = ""


class Attachment(ABC):
    """Something that runs beside one engine: a reporter to the controller, a server that
    offers the engine's memory tier to peers.

    Its factory (``factory(engine) -> Attachment | None``, registered through
    ``kvcore_register_attachments``) is called once the engine's tiers and store pipeline
    exist; it starts what it needs and returns the running attachment, or ``None`` when its
    settings leave it off. The engine closes its attachments, last started first, before its
    tiers. A factory is called only in an engine built with ``attachments=True`` (not in a
    lookup-only one, such as vLLM's scheduler when its worker runs elsewhere).
    """

    @abstractmethod
    def close(self) -> None:
        """Stop: threads joined, sockets closed, within a second or two; idempotent."""


AttachmentFactory = Callable[["CacheEngine"], "Attachment | None"]
"""``factory(engine)``: start an attachment for ``engine``, or return ``None`` (off)."""
