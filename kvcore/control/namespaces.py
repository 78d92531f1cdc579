"""The controller's view of namespaces: what instances report (with served model names) and
the listing ``GET /v1/namespaces`` serves."""

from __future__ import annotations

from kvcore.control import models as m
from kvcore.control.index import GlobalIndex, answers_to
from kvcore.keys import Namespace
from kvcore.namespaces import NamespaceEntry


def reported_namespaces(reports: list[m.NamespaceReport]) -> dict[bytes, NamespaceEntry]:
    """An instance's reports by digest; the controller hashes the fields itself, so a report
    cannot claim another namespace's chunks."""
    out: dict[bytes, NamespaceEntry] = {}
    for report in reports:
        namespace = Namespace(**report.model_dump(exclude={"served_as", "keyed_by"}))
        out[namespace.digest] = NamespaceEntry(namespace, tuple(report.served_as),
                                               report.keyed_by)
    return out


def namespace_listing(index: GlobalIndex, model: str | None = None,
                      tenant: str | None = None) -> list[m.NamespaceInfo]:
    """Every namespace known to an instance or holding indexed chunks, narrowed to ``model``
    (a served name or model) and ``tenant`` when given; namespaces no instance reported are
    listed only without a filter."""
    entries: dict[bytes, NamespaceEntry] = {}
    holders: dict[bytes, list[m.NamespaceHolder]] = {}
    for state in index.instances.values():
        for digest, entry in state.namespaces.items():
            entries.setdefault(digest, entry)
        counts = state.chunks_by_namespace()
        for digest in dict.fromkeys([*state.namespaces, *counts]):
            holders.setdefault(digest, []).append(m.NamespaceHolder(
                instance=state.id, name=state.name, chunks_by_tier=counts.get(digest, {})))
    out = []
    for digest, instances in holders.items():
        known = entries.get(digest)
        if known is None:
            if model is None and tenant is None:
                out.append(m.NamespaceInfo(id=digest.hex(), known=False, instances=instances))
            continue
        entry, ns = known, known.namespace
        if (model is not None and not answers_to(entry, model)) or (
                tenant is not None and ns.tenant != tenant):
            continue
        out.append(m.NamespaceInfo(
            id=digest.hex(), known=True, model=ns.model, served_as=list(entry.served_as),
            tenant=ns.tenant, dtype=ns.dtype, layout=ns.layout, geometry=ns.geometry,
            rank=ns.rank, world_size=ns.world_size, keyed_by=entry.keyed_by,
            instances=instances))
    return out
