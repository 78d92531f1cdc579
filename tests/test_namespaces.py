"""The engine's book of namespaces: declared ones kept, seen ones bounded, tenants inherit."""

from __future__ import annotations

from kvcore.keys import Namespace
from kvcore.namespaces import NamespaceBook


def test_a_tenant_namespace_inherits_the_served_names_of_its_shared_one() -> None:
    book = NamespaceBook()
    shared = Namespace("org/model@main", layout="vllm-cpu")
    book.declare(shared, served_as=["chat", "chat", ""], keyed_by="tokens")
    book.remember(shared.with_tenant("acme"))
    book.remember(Namespace("other-model", tenant="acme"))
    entries = {e.namespace.digest: e for e in book.entries()}
    assert entries[shared.digest].served_as == ("chat",)
    assert entries[shared.with_tenant("acme").digest].served_as == ("chat",)
    assert entries[Namespace("other-model", tenant="acme").digest].served_as == ()
    assert book.get(shared.with_tenant("acme").digest) == shared.with_tenant("acme")
    assert book.get(b"\0" * 8) is None


def test_seen_namespaces_are_bounded_and_declared_ones_stay() -> None:
    book = NamespaceBook(max_seen=3)
    declared = Namespace("served")
    book.declare(declared, served_as=["served"])
    for i in range(10):
        book.remember(Namespace("served", tenant=f"t{i}"))
    tenants = [e.namespace.tenant for e in book.entries()]
    assert tenants == ["", "t7", "t8", "t9"]
    version = book.version
    book.remember(Namespace("served", tenant="t8"))  # known: no new version
    book.declare(declared, served_as=["served"])
    assert book.version == version
    assert [n.tenant for n in book.namespaces()[-2:]] == ["t8", ""]  # seen again; declared
