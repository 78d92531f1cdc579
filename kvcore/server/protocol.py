"""The messages between ``kvcore server`` and its engines: msgspec structs in msgpack over a
ZMQ DEALER/ROUTER pair, each request framed as ``[sequence number (8 bytes), message]`` and
answered (unless one-way) as ``[the same number, reply]``. Offsets address the shared arena, so
no KV byte ever travels on the socket.

Decoding validates types; the server also checks keys' length and counts (:func:`check`), and
the client checks every offset against its mapping (:meth:`SharedArena.view`).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from kvcore.keys import KEY_BYTES
from kvcore.server.settings import zmq_address

__all__ = ["zmq_address"]  # the address helper is used with the messages

MAX_KEYS = 65536
"""Keys in one request (an 8K-token prompt is 32 chunks of 256 tokens)."""
MAX_MESSAGE_BYTES = 4 << 20
"""Largest message either side accepts (ZMQ drops larger ones before they are read)."""


class Hello(msgspec.Struct, tag=True):
    pid: int
    pid_namespace: str = ""
    """``/proc/self/ns/pid`` of the client: in the server's own, a silent client whose pid is
    alive keeps its lease (it is slow or stopped, and may still be writing)."""


class Ping(msgspec.Struct, tag=True):
    """Keeps this client's lease alive."""


class Bye(msgspec.Struct, tag=True):
    """This client leaves: end its lease now."""


class Reserve(msgspec.Struct, tag=True):
    key: bytes
    nbytes: int
    parent: bytes | None = None


class ReserveMany(msgspec.Struct, tag=True):
    """Reserve several chunks of ``nbytes`` each (one store): answered with :class:`Extents`."""

    keys: list[bytes]
    nbytes: int
    parents: list[bytes | None]


class Commit(msgspec.Struct, tag=True):
    key: bytes


class Abort(msgspec.Struct, tag=True):
    key: bytes


class Acquire(msgspec.Struct, tag=True):
    keys: list[bytes]


class Release(msgspec.Struct, tag=True):
    keys: list[bytes]


class Contains(msgspec.Struct, tag=True):
    keys: list[bytes]


class Touch(msgspec.Struct, tag=True):
    keys: list[bytes]


class Delete(msgspec.Struct, tag=True):
    keys: list[bytes]


class Pin(msgspec.Struct, tag=True):
    keys: list[bytes]


class Unpin(msgspec.Struct, tag=True):
    keys: list[bytes]


class Usage(msgspec.Struct, tag=True):
    pass


class Locate(msgspec.Struct, tag=True):
    """Which tier of the server holds each key (memory or one below it): answered with
    :class:`Sources`. Chunks found only below memory start coming up at once."""

    keys: list[bytes]


class Fill(msgspec.Struct, tag=True):
    """Bring ``keys`` up from the server's lower tiers into shared memory, waiting at most
    ``wait_s``: answered with the :class:`Count` brought."""

    keys: list[bytes]
    parents: list[bytes | None]
    wait_s: Annotated[float, msgspec.Meta(ge=0, le=600)]


class Flush(msgspec.Struct, tag=True):
    """Wait at most ``wait_s`` for the server's write-behind: a :class:`Flags` of one value."""

    wait_s: Annotated[float, msgspec.Meta(ge=0, le=600)]


class ClearTiers(msgspec.Struct, tag=True):
    """Remove every chunk (of ``namespace``, from ``tier``; ``None``: all): a :class:`Count`."""

    namespace: Annotated[bytes, msgspec.Meta(min_length=8, max_length=8)] | None = None
    tier: Annotated[str, msgspec.Meta(max_length=64)] | None = None


Text = Annotated[str, msgspec.Meta(max_length=512)]


class NamespaceNote(msgspec.Struct):
    """A namespace an engine serves or derived keys from (:class:`kvcore.keys.Namespace`'s
    fields, and the names clients know it by)."""

    model: Text
    dtype: Annotated[str, msgspec.Meta(max_length=32)]
    layout: Annotated[str, msgspec.Meta(max_length=64)]
    geometry: Text
    rank: Annotated[int, msgspec.Meta(ge=0, le=1 << 16)]
    world_size: Annotated[int, msgspec.Meta(ge=1, le=1 << 16)]
    tenant: Text
    served_as: Annotated[list[Annotated[str, msgspec.Meta(max_length=256)]],
                         msgspec.Meta(max_length=8)]
    keyed_by: Literal["tokens", "engine"]
    declared: bool


class Namespaces(msgspec.Struct, tag=True):
    """The namespaces an engine knows (one-way): the server's codecs learn each one's element
    type, and its controller reporter lists them."""

    entries: Annotated[list[NamespaceNote], msgspec.Meta(max_length=512)]


class ListKeys(msgspec.Struct, tag=True):
    pass


ONE_WAY = (Commit, Abort, Release, Touch, Namespaces)
"""Requests the server never answers (the client does not wait): the socket keeps their order,
so a commit is done before any later request of the same client is served."""

LEASELESS = (Locate, Fill, Flush, ClearTiers, Delete, Pin, Unpin, Usage, Namespaces)
"""Requests that need no lease (they hold nothing): an engine sends them on a second socket,
so a slow lower tier behind them never delays its stores and loads."""

Request = (Hello | Ping | Bye | Reserve | ReserveMany | Commit | Abort | Acquire | Release
           | Contains | Touch | Delete | Pin | Unpin | Usage | ListKeys | Locate | Fill
           | Flush | ClearTiers | Namespaces)


class Welcome(msgspec.Struct, tag=True):
    arena: str
    """Path of the shared-memory file to map."""
    arena_bytes: int
    epoch: str
    """Changes at every server start: holds and reservations of another epoch are void."""
    budget: int
    lease_s: float
    below: list[str] = []
    """The server's tiers below shared memory (``KVCORE_TIERS`` after the first)."""
    memory: str = "cpu"
    """The name of the server's memory tier in :class:`Sources` answers."""
    instance: str = ""
    """The server's instance id at the controller (empty: it reports to none)."""


class Offset(msgspec.Struct, tag=True):
    offset: int
    """-1: not reserved (present, too big, full, or refused by admission)."""


class Extents(msgspec.Struct, tag=True):
    offsets: list[int]
    """-1 for a miss."""
    sizes: list[int]


class Flags(msgspec.Struct, tag=True):
    values: list[bool]


class Count(msgspec.Struct, tag=True):
    n: int


class UsageReply(msgspec.Struct, tag=True):
    used_bytes: int
    budget_bytes: int
    chunks: int


class KeyList(msgspec.Struct, tag=True):
    keys: list[bytes]


class Sources(msgspec.Struct, tag=True):
    tiers: list[str]
    """The server's tiers, fastest first."""
    where: bytes
    """For each key, one byte: 0 where no tier holds it, else 1 + the index in ``tiers``."""
    costs: dict[str, tuple[float, int]] = {}
    """For each lower tier the server has read from: seconds per chunk read (moving
    average) and chunks being read now; the engines' planners plan with it."""


class Done(msgspec.Struct, tag=True):
    pass


class Failed(msgspec.Struct, tag=True):
    error: str


Reply = (Welcome | Offset | Extents | Flags | Count | UsageReply | KeyList | Sources | Done
         | Failed)

request_decoder = msgspec.msgpack.Decoder(Request)
reply_decoder = msgspec.msgpack.Decoder(Reply)
encode = msgspec.msgpack.Encoder().encode


def check_keys(keys: list[bytes]) -> None:
    """A ValueError naming what is wrong with keys from a client."""
    if len(keys) > MAX_KEYS:
        raise ValueError(f"{len(keys)} keys in one request (at most {MAX_KEYS})")
    for key in keys:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a chunk key is {KEY_BYTES} bytes, not {len(key)}")
