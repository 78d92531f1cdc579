"""The namespaces an engine knows: the ones its connector declared and the ones it derived keys
from, with the human parts a key's 8-byte digest hides (served model name, tenant).

The miss recorder reads it to say which field a miss differs in; the controller reporter sends
it so that a gateway can list namespaces and route by served model name
(:mod:`kvcore.control`). Bounded by entry counts; thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from kvcore.keys import Namespace

KeyedBy = Literal["tokens", "engine"]
"""How a namespace's chunk keys are made: ``tokens`` by :func:`kvcore.keys.chunk_keys` (a
controller can derive them from token ids), ``engine`` by the engine's own page hashes (SGLang)."""

MAX_SEEN = 256
"""Namespaces remembered from key derivations (the most recent)."""
MAX_DECLARED = 64
"""Namespaces connectors declare (one per model, rank and layout an engine serves)."""
MAX_NAMES = 8
"""Served names kept per namespace."""


@dataclass(frozen=True)
class NamespaceEntry:
    """A namespace with what an operator calls it."""

    namespace: Namespace
    served_as: tuple[str, ...] = ()
    """The served model names it answers to (vLLM's ``--served-model-name``), first is main."""
    keyed_by: KeyedBy = "tokens"

    def as_report(self) -> dict[str, object]:
        """The fields the controller reporter sends (the controller recomputes the digest)."""
        ns = self.namespace
        return {"model": ns.model, "dtype": ns.dtype, "layout": ns.layout,
                "geometry": ns.geometry, "rank": ns.rank, "world_size": ns.world_size,
                "tenant": ns.tenant, "served_as": list(self.served_as),
                "keyed_by": self.keyed_by}


class NamespaceBook:
    """Declared namespaces (kept) and seen ones (the newest :data:`MAX_SEEN`).

    A seen namespace of a tenant inherits the served names and key scheme of its declared
    shared-tenant namespace. :attr:`version` grows whenever the set of entries changes.
    """

    def __init__(self, max_seen: int = MAX_SEEN, max_declared: int = MAX_DECLARED) -> None:
        self._declared: OrderedDict[bytes, NamespaceEntry] = OrderedDict()
        self._seen: OrderedDict[bytes, NamespaceEntry] = OrderedDict()
        self._max_seen = max_seen
        self._max_declared = max_declared
        self._lock = threading.Lock()
        self.version = 0

    def declare(self, namespace: Namespace, served_as: Sequence[str] = (),
                keyed_by: KeyedBy = "tokens") -> None:
        """A namespace the engine serves, and the names a client may ask for it by."""
        names = tuple(dict.fromkeys(n for n in served_as if n))[:MAX_NAMES]
        entry = NamespaceEntry(namespace, names, keyed_by)
        digest = namespace.digest
        with self._lock:
            if self._declared.get(digest) == entry:
                return
            self._declared[digest] = entry
            while len(self._declared) > self._max_declared:
                self._declared.popitem(last=False)
            self._seen.pop(digest, None)
            self.version += 1

    def remember(self, namespace: Namespace) -> None:
        """A namespace the engine derived keys from."""
        digest = namespace.digest
        shared = namespace.with_tenant("").digest if namespace.tenant else None
        with self._lock:
            if digest in self._declared:
                return
            if digest in self._seen:
                self._seen.move_to_end(digest)
                return
            base = self._declared.get(shared) if shared is not None else None
            self._seen[digest] = (NamespaceEntry(namespace, base.served_as, base.keyed_by)
                                  if base is not None else NamespaceEntry(namespace))
            while len(self._seen) > self._max_seen:
                self._seen.popitem(last=False)
            self.version += 1

    def get(self, digest: bytes) -> Namespace | None:
        with self._lock:
            entry = self._declared.get(digest) or self._seen.get(digest)
        return entry.namespace if entry is not None else None

    def entries(self) -> list[NamespaceEntry]:
        """Declared entries first, then seen ones, oldest first."""
        with self._lock:
            return [*self._declared.values(), *self._seen.values()]

    def entries_declared(self) -> list[tuple[NamespaceEntry, bool]]:
        """:meth:`entries`, each with whether a connector declared it."""
        with self._lock:
            return [*((e, True) for e in self._declared.values()),
                    *((e, False) for e in self._seen.values())]

    def namespaces(self) -> list[Namespace]:
        """Every known namespace: seen ones oldest first, then the declared ones (a miss is
        checked against the last few, and the declared ones always count)."""
        with self._lock:
            entries = [*self._seen.values(), *self._declared.values()]
        return [e.namespace for e in entries]
