"""Batched KV copies on a GPU: byte-exact for every layout, chunk buffers pinned, pageable and on
the device, on a caller's stream. Skips cleanly without a GPU. Set KVCORE_REQUIRE_NATIVE_CUDA=1 (as
bench/gpu_check.sh does) to fail, not skip, when the native CUDA library is missing."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from kvcore.copy import KVLayout, gather, native, ops, scatter  # noqa: E402

_spec = importlib.util.spec_from_file_location("_copy_cpu_cases", Path(__file__).with_name(
    "test_copy.py"))
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)  # the same layouts and block tables as the CPU tests

DEV = torch.device("cuda")
# Read at import: the core conftest clears KVCORE_* variables before each test.
REQUIRE_NATIVE = os.environ.get("KVCORE_REQUIRE_NATIVE_CUDA") == "1"


def _native_or_skip() -> None:
    if native.cuda_usable() is None:
        msg = f"native CUDA library unavailable: {native.errors.get(native.CUDA_LIB)}"
        if REQUIRE_NATIVE:
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(params=["native-direct", "native-staged", "fallback"])
def backend(request, monkeypatch):
    name = request.param
    if name.startswith("native"):
        _native_or_skip()
        monkeypatch.setenv("KVCORE_COPY_CUDA_MODE", name.split("-")[1])
    real = ops.run
    chosen = "fallback" if name == "fallback" else "native"
    monkeypatch.setattr(ops, "run", lambda p, stream=None: real(p, stream, chosen))
    return name


def _buffer(kind: str, nbytes: int):
    if kind == "pinned":
        return torch.full((nbytes,), 0xAB, dtype=torch.uint8, pin_memory=True)
    if kind == "pageable":
        return np.full(nbytes, 0xAB, dtype=np.uint8)
    return torch.full((nbytes,), 0xAB, dtype=torch.uint8, device=DEV)


def _host(buf) -> np.ndarray:
    return buf.cpu().numpy() if isinstance(buf, torch.Tensor) else buf


@pytest.mark.parametrize("name", sorted(cases.LAYOUTS))
@pytest.mark.parametrize("table", ["shuffled", "repeated", "reversed"])
@pytest.mark.parametrize("kind", ["pinned", "pageable", "device"])
def test_gather_matches_reference(backend, name, table, kind):
    layers, layout, read = cases.LAYOUTS[name](torch.bfloat16, DEV)
    ids, k = cases.TABLES[table], 3
    expect = cases.reference_gather(layers, read, ids, k)
    dests = [_buffer(kind, e.size + 32) for e in expect]
    gather(layers, layout, ids, dests, k)
    torch.cuda.synchronize()
    for d, e in zip(dests, expect):
        got = _host(d)
        assert np.array_equal(got[: e.size], e)
        assert (got[e.size :] == 0xAB).all()


@pytest.mark.parametrize("name", ["vllm_flash", "flashinfer", "mla", "vllm_cpu"])
@pytest.mark.parametrize("kind", ["pinned", "pageable", "device"])
def test_round_trip_on_a_side_stream(backend, name, kind):
    layers, layout, read = cases.LAYOUTS[name](torch.float16, DEV)
    cpu_layers = [t.cpu() for t in layers]
    ids, k = np.array([7, 0, 11, 3, 3, 5, 9]), 2
    sizes = [layout.chunk_bytes(len(layers), len(ids[j : j + k])) for j in range(0, len(ids), k)]
    bufs = [_buffer(kind, s) for s in sizes]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    gather(layers, layout, ids, bufs, k, stream=stream)
    with torch.cuda.stream(stream):
        for t in layers:
            t.zero_()
    scatter(bufs, layers, layout, ids, k, stream=stream.cuda_stream)  # raw handle works too
    stream.synchronize()
    sel = torch.as_tensor(sorted(set(ids.tolist())))
    untouched = torch.as_tensor(sorted(set(range(cases.NB)) - set(ids.tolist())))
    for t, c in zip(layers, cpu_layers):
        assert torch.equal(read(t.cpu(), sel), read(c, sel))
        assert not read(t.cpu(), untouched).any()


def test_odd_sizes_take_the_byte_path(backend):
    layers = [torch.randint(0, 255, (9, 3, 5, 7), dtype=torch.uint8, device=DEV) for _ in range(2)]
    layout = KVLayout.for_vllm_cpu(layers[0])  # 105-byte blocks: no wide accesses possible
    ids = np.array([8, 1, 4])
    dest = _buffer("pinned", layout.chunk_bytes(2, 3))
    gather(layers, layout, ids, [dest], 3)
    torch.cuda.synchronize()
    expect = torch.cat([t[torch.as_tensor(ids)].cpu().reshape(-1) for t in layers])
    assert torch.equal(dest, expect)


def test_bad_index_and_small_buffer_write_nothing(backend):
    layers, layout, _ = cases.LAYOUTS["vllm_flash"](torch.bfloat16, DEV)
    dest = _buffer("pinned", layout.chunk_bytes(len(layers), 2))
    with pytest.raises(ValueError, match=rf"block index {cases.NB}"):
        gather(layers, layout, [1, cases.NB], [dest], 2)
    with pytest.raises(ValueError, match=r"dests\[0\] is too small"):
        gather(layers, layout, [1, 2], [dest[:-1]], 2)
    torch.cuda.synchronize()
    assert (dest == 0xAB).all()


def test_native_cuda_checks_indices_itself():
    _native_or_skip()
    from kvcore.copy.buffers import plan

    layers, layout, _ = cases.LAYOUTS["mla"](torch.bfloat16, DEV)
    dest = _buffer("device", layout.chunk_bytes(len(layers), 2))
    p = plan(True, layers, layout, [0, 1], [dest], 2)
    p.block_ids = np.array([0, 10**6], dtype=np.int64)
    with pytest.raises(ValueError, match="block index 1000000"):
        native.run_cuda(p, torch.cuda.current_stream().cuda_stream, 0)
    torch.cuda.synchronize()
    assert (dest == 0xAB).all()


def test_backend_info_reports_native_cuda():
    _native_or_skip()
    from kvcore.copy import backend_info

    assert backend_info()["active"] == "native-cuda"
