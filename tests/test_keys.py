"""Chunk keys: stable across processes and hash seeds, separated by namespace."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from kvcore.keys import KEY_BYTES, Namespace, chunk_keys, key_namespace

SCRIPT = (
    "from kvcore.keys import Namespace, chunk_keys;"
    "print(','.join(k.hex() for k in chunk_keys(Namespace('m', tenant='t'), range(1000), 16)))"
)


def test_keys_identical_across_processes_and_hash_seeds() -> None:
    outputs = set()
    for seed in ("0", "1", "12345", "random"):
        proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                              env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"}, check=True)
        outputs.add(proc.stdout.strip())
    assert len(outputs) == 1
    local = ",".join(k.hex() for k in chunk_keys(Namespace("m", tenant="t"), range(1000), 16))
    assert outputs == {local}


def test_only_full_chunks_have_keys() -> None:
    keys = chunk_keys(Namespace("m"), list(range(70)), 16)
    assert len(keys) == 4 and all(len(k) == KEY_BYTES for k in keys)


def test_chaining_depends_on_every_earlier_token() -> None:
    ns = Namespace("m")
    a = chunk_keys(ns, list(range(64)), 16)
    tokens = list(range(64))
    tokens[3] = 99999
    b = chunk_keys(ns, tokens, 16)
    assert all(x != y for x, y in zip(a, b))
    tokens = list(range(64))
    tokens[40] = 99999
    c = chunk_keys(ns, tokens, 16)
    assert c[:2] == a[:2] and c[2] != a[2] and c[3] != a[3]


@pytest.mark.parametrize("field,value", [("model", "other"), ("dtype", "float16"),
                                         ("layout", "vllm-flash"), ("geometry", "L32"),
                                         ("rank", 1), ("tenant", "acme")])
def test_namespace_fields_separate_keys(field: str, value: object) -> None:
    base = Namespace("m")
    other = Namespace(**{**base.__dict__, field: value})
    assert chunk_keys(base, range(32), 16)[0] != chunk_keys(other, range(32), 16)[0]
    assert key_namespace(chunk_keys(other, range(32), 16)[0]) == other.digest


def test_numpy_and_list_tokens_agree() -> None:
    ns = Namespace("m")
    tokens = np.arange(512, dtype=np.int64)
    assert chunk_keys(ns, tokens, 128) == chunk_keys(ns, tokens.tolist(), 128)


def test_out_of_range_token_is_rejected() -> None:
    with pytest.raises(ValueError, match="token ids"):
        chunk_keys(Namespace("m"), [-1] * 16, 16)


def test_tenant_salts_the_chained_hash_not_only_the_namespace_digest() -> None:
    """Issue 17: the 16-byte chained hash was the same for every tenant (64-bit separation)."""
    from kvcore.keys import NAMESPACE_BYTES

    tokens = list(range(64))
    shared = chunk_keys(Namespace("m"), tokens, 16)
    tenants = {t: chunk_keys(Namespace("m", tenant=t), tokens, 16) for t in ("a", "b", "acme")}
    hashes = {k[NAMESPACE_BYTES:] for keys in [shared, *tenants.values()] for k in keys}
    assert len(hashes) == 4 * 4  # no chained hash shared between any two tenants
    # A forged namespace digest (say, a 64-bit collision with tenant a's) still never matches:
    forged = chunk_keys(Namespace("m", tenant="a").digest, tokens, 16, tenant="b")
    assert not set(forged) & set(tenants["a"])
    # Given the digest and the tenant, anyone (the controller) computes the same keys.
    assert chunk_keys(Namespace("m", tenant="a").digest, tokens, 16, tenant="a") == tenants["a"]
    with pytest.raises(ValueError, match="tenant"):
        chunk_keys(Namespace("m", tenant="a"), tokens, 16, tenant="b")


@pytest.mark.parametrize("tokens", [[1.7] * 16, [1.0] * 16, np.full(16, 1.7),
                                    [True] * 16, ["1"] * 16, [1] * 15 + [2.5]])
def test_non_integer_token_ids_are_refused_not_truncated(tokens: object) -> None:
    """Issue 17: [1.7] keyed like [1]."""
    with pytest.raises(TypeError, match="integers"):
        chunk_keys(Namespace("m"), tokens, 16)  # type: ignore[arg-type]


def test_integer_token_ids_of_any_integer_type_agree() -> None:
    ns = Namespace("m")
    ints = list(range(32))
    assert (chunk_keys(ns, ints, 16) == chunk_keys(ns, np.arange(32, dtype=np.uint32), 16)
            == chunk_keys(ns, np.arange(32, dtype=np.int16), 16)
            == chunk_keys(ns, [np.int64(i) for i in ints], 16))
    assert chunk_keys(ns, [], 16) == []
    with pytest.raises(ValueError, match="token ids"):
        chunk_keys(ns, [2**64] * 16, 16)
