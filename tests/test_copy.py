"""Batched KV copies: byte-exact against a pure-torch reference for every layout, both backends."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvcore.copy import KVLayout, backend_info, buffers, gather, native, ops, scatter

NB = 12  # blocks (pages) per layer
L = 3

# name -> (make all layers, layout builder, semantic per-layer block reader in chunk byte order)
# A reader takes one layer tensor and block ids and returns [k, ...] whose bytes, in order, are
# what the chunk buffer must hold for that layer.


def _vllm_cpu(dtype, device="cpu"):
    layers = [torch.randn(NB, 2, 16, 2 * 8, device=device).to(dtype) for _ in range(L)]
    return layers, KVLayout.for_vllm_cpu(layers[0]), lambda t, ids: t[ids]


def _vllm_cpu_cross_layer(dtype, device="cpu"):
    big = torch.randn(NB, L, 2, 16, 16, device=device).to(dtype)  # layer views strided by L
    layers = [big[:, i] for i in range(L)]
    return layers, KVLayout.for_vllm_cpu(layers[0]), lambda t, ids: t[ids]


def _vllm_flash(dtype, device="cpu"):
    layers = [torch.randn(2, NB, 16, 2, 8, device=device).to(dtype) for _ in range(L)]
    return layers, KVLayout.for_vllm_flash(layers[0]), lambda t, ids: t[:, ids].transpose(0, 1)


def _flashinfer(dtype, device="cpu"):
    layers = [torch.randn(NB, 2, 16, 2, 8, device=device).to(dtype) for _ in range(L)]
    return layers, KVLayout.for_flashinfer(layers[0]), lambda t, ids: t[ids]


def _mla(dtype, device="cpu"):
    layers = [torch.randn(NB, 16, 72, device=device).to(dtype) for _ in range(L)]
    return layers, KVLayout.for_mla(layers[0]), lambda t, ids: t[ids]


PS = 4  # SGLang page size


def _sglang_layer_first(dtype, device="cpu"):
    kv = torch.randn(2, L, NB * PS, 2, 8, device=device).to(dtype)
    layout, views = KVLayout.for_sglang_layer_first(kv, PS)
    return views, layout, lambda t, ids: t.reshape(2, NB, PS, 2, 8)[:, ids].transpose(0, 1)


def _sglang_page_first(dtype, device="cpu"):
    kv = torch.randn(2, NB * PS, L, 2, 8, device=device).to(dtype)
    layout, views = KVLayout.for_sglang_page_first(kv, PS)
    return views, layout, lambda t, ids: t.reshape(NB, PS, 2, 8)[ids]


def _sglang_mla_layer_first(dtype, device="cpu"):
    kv = torch.randn(L, NB * PS, 1, 40, device=device).to(dtype)
    layout, views = KVLayout.for_sglang_layer_first(kv, PS)
    return views, layout, lambda t, ids: t.reshape(NB, PS, 40)[ids]


def _sglang_mla_page_first(dtype, device="cpu"):
    kv = torch.randn(NB * PS, L, 1, 40, device=device).to(dtype)
    layout, views = KVLayout.for_sglang_page_first(kv, PS)
    return views, layout, lambda t, ids: t.reshape(NB, PS, 40)[ids]


LAYOUTS = {f.__name__[1:]: f for f in (_vllm_cpu, _vllm_cpu_cross_layer, _vllm_flash,
                                        _flashinfer, _mla, _sglang_layer_first,
                                        _sglang_page_first, _sglang_mla_layer_first,
                                        _sglang_mla_page_first)}

rng = np.random.default_rng(7)
TABLES = {
    "shuffled": rng.permutation(NB)[:9],
    "repeated": np.array([3, 3, 0, 7, 3, 0, 11]),
    "reversed": np.arange(NB)[::-1].copy(),
    "consecutive": np.arange(2, 10),
    "single": np.array([5]),
}
BACKENDS = ["native", "fallback"] if native.cpu_lib() is not None else ["fallback"]


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().cpu().view(torch.uint8).numpy().reshape(-1)


def reference_gather(layers, read, ids, k):
    chunks = []
    for j in range(0, len(ids), k):
        sel = torch.as_tensor(ids[j : j + k], dtype=torch.long)
        chunks.append(np.concatenate([_as_bytes(read(t, sel)) for t in layers]))
    return chunks


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    real = ops.run
    monkeypatch.setattr(ops, "run", lambda p, stream=None: real(p, stream, request.param))
    return request.param


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("table", sorted(TABLES))
@pytest.mark.parametrize("k", [1, 3, 4])
def test_gather_matches_reference(backend, name, table, k):
    layers, layout, read = LAYOUTS[name](torch.bfloat16)
    ids = TABLES[table]
    expect = reference_gather(layers, read, ids, k)
    dests = [np.full(e.size + 16, 0xAB, dtype=np.uint8) for e in expect]  # slack must stay
    gather(layers, layout, ids, dests, k)
    for d, e in zip(dests, expect):
        assert np.array_equal(d[: e.size], e)
        assert (d[e.size :] == 0xAB).all()


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("k", [2, 5])
def test_scatter_matches_reference(backend, name, k):
    layers, layout, read = LAYOUTS[name](torch.float16)
    before = [t.clone() for t in layers]
    ids = rng.permutation(NB)[:7]  # unique: the result is defined
    sizes = [layout.chunk_bytes(len(layers), len(ids[j : j + k])) for j in range(0, len(ids), k)]
    srcs = [rng.integers(0, 256, s, dtype=np.uint8) for s in sizes]
    scatter([memoryview(s.tobytes()) for s in srcs], layers, layout, ids, k)  # read-only srcs
    got = reference_gather(layers, read, ids, k)
    for g, s in zip(got, srcs):
        assert np.array_equal(g, s)
    untouched = sorted(set(range(NB)) - set(ids.tolist()))
    sel = torch.as_tensor(untouched)
    for t, b in zip(layers, before):
        assert np.array_equal(_as_bytes(read(t, sel)), _as_bytes(read(b, sel)))


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("table", sorted(TABLES))
def test_round_trip(backend, name, table):
    layers, layout, read = LAYOUTS[name](torch.bfloat16)
    original = [t.clone() for t in layers]
    ids = TABLES[table]
    k = 3
    sizes = [layout.chunk_bytes(len(layers), len(ids[j : j + k]))
             for j in range(0, len(ids), k)]
    dests = [torch.empty(s, dtype=torch.uint8) for s in sizes]  # torch chunk buffers
    gather(layers, layout, ids, dests, k)
    for t in layers:
        t.zero_()
    scatter(dests, layers, layout, ids, k)
    sel = torch.as_tensor(sorted(set(ids.tolist())))
    for t, o in zip(layers, original):
        assert torch.equal(read(t, sel), read(o, sel))


def test_numpy_layers_and_native_equals_fallback_on_large_copy():
    # 11 MB: above the native threading and streaming-store thresholds, with runs of adjacent
    # blocks that get merged, repeats, and destinations at odd (unaligned) addresses.
    layers = [np.random.default_rng(i).integers(0, 256, (64, 4, 16, 1024), dtype=np.uint8)
              for i in range(4)]
    layout = KVLayout.for_vllm_cpu(layers[0])
    ids = np.concatenate([np.arange(10, 40), np.arange(60, 50, -1), [3, 3, 63]])
    k = 16
    sizes = [layout.chunk_bytes(4, len(ids[j : j + k])) for j in range(0, len(ids), k)]
    a = [np.zeros(s, np.uint8) for s in sizes]
    b = [np.zeros(s + 3, np.uint8)[3:] for s in sizes]
    ops.run(buffers.plan(True, layers, layout, ids, a, k), backend="fallback")
    gather(layers, layout, ids, b, k)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    assert np.array_equal(b[0][: layout.block_bytes], layers[0][10].reshape(-1))
    fresh = [np.zeros_like(t) for t in layers]
    scatter(b, fresh, layout, ids, k)
    used = sorted(set(ids.tolist()))
    for t, f in zip(layers, fresh):
        assert np.array_equal(t[used], f[used])


@pytest.mark.parametrize("bad", [NB, -1, 10**9])
def test_bad_block_index_is_a_clear_error_and_writes_nothing(backend, bad):
    layers, layout, _ = LAYOUTS["vllm_flash"](torch.bfloat16)
    ids = np.array([0, 1, bad, 2])
    dests = [np.full(layout.chunk_bytes(L, 2), 7, np.uint8) for _ in range(2)]
    with pytest.raises(ValueError, match=rf"block index {bad} \(block_ids\[2\]\)"):
        gather(layers, layout, ids, dests, 2)
    assert all((d == 7).all() for d in dests)
    before = [t.clone() for t in layers]
    with pytest.raises(ValueError, match=rf"block index {bad}"):
        scatter(dests, layers, layout, ids, 2)
    assert all(torch.equal(t, b) for t, b in zip(layers, before))


def test_buffer_too_small_names_the_buffer(backend):
    layers, layout, _ = LAYOUTS["vllm_cpu"](torch.bfloat16)
    need = layout.chunk_bytes(L, 2)
    dests = [np.zeros(need, np.uint8), np.full(need - 1, 5, np.uint8)]
    with pytest.raises(ValueError,
                       match=rf"dests\[1\] is too small: {need - 1} bytes, needs {need}"):
        gather(layers, layout, [0, 1, 2, 3], dests, 2)
    assert (dests[0] == 0).all() and (dests[1] == 5).all()
    before = [t.clone() for t in layers]
    with pytest.raises(ValueError, match=r"srcs\[1\] is too small"):
        scatter(dests, layers, layout, [0, 1, 2, 3], 2)
    assert all(torch.equal(t, b) for t, b in zip(layers, before))


def test_other_argument_errors():
    layers, layout, _ = LAYOUTS["mla"](torch.bfloat16)
    need = layout.chunk_bytes(L, 2)
    with pytest.raises(ValueError, match="expected 2"):
        gather(layers, layout, [0, 1, 2], [np.zeros(need, np.uint8)], 2)
    with pytest.raises(ValueError, match="read-only"):
        gather(layers, layout, [0, 1], [memoryview(bytes(need))], 2)
    with pytest.raises(ValueError, match=r"layers\[1\] differs"):
        gather([layers[0], layers[1][:5]], layout, [0], [np.zeros(need, np.uint8)], 2)
    with pytest.raises(ValueError, match="must be integers"):
        gather(layers, layout, [0.0, 1.0], [np.zeros(need, np.uint8)], 2)
    dest = np.zeros(need, np.uint8)
    gather(layers, layout, torch.tensor([1, 0]), [dest], 2)  # torch block tables are accepted
    assert np.array_equal(dest[: layout.block_bytes], _as_bytes(layers[0][1]))
    with pytest.raises(ValueError, match="not contiguous"):
        KVLayout.for_vllm_cpu(torch.zeros(4, 2, 16, 32).transpose(1, 2))
    with pytest.raises(ValueError, match="4-dim"):
        KVLayout.for_vllm_cpu(torch.zeros(4, 16, 32))


@pytest.mark.skipif(native.cpu_lib() is None, reason="native CPU library not built")
def test_native_library_checks_indices_itself():
    """Even if the Python checks were bypassed, the C side refuses before writing."""
    layers, layout, _ = LAYOUTS["vllm_cpu"](torch.bfloat16)
    dest = np.full(layout.chunk_bytes(L, 2), 9, np.uint8)
    p = buffers.plan(True, layers, layout, [0, 1], [dest], 2)
    p.block_ids = np.array([0, NB], dtype=np.int64)
    with pytest.raises(ValueError, match=f"block index {NB}"):
        native.run_cpu(p)
    p.block_ids = np.array([0, 1], dtype=np.int64)
    p.chunks[0].nbytes -= 1
    with pytest.raises(ValueError, match="chunk buffer 0 holds"):
        native.run_cpu(p)
    assert (dest == 9).all()


def test_empty_request_is_a_no_op():
    layers, layout, _ = LAYOUTS["vllm_cpu"](torch.bfloat16)
    gather(layers, layout, [], [], 4)
    scatter([], layers, layout, np.array([], dtype=np.int64), 4)


def test_layout_constructors_match_the_documented_formulas():
    t = torch.zeros(10, 8, 16, 256, dtype=torch.bfloat16)
    assert KVLayout.for_vllm_cpu(t) == KVLayout(1, 8 * 16 * 256 * 2, 8 * 16 * 256 * 2)
    f = torch.zeros(2, 10, 16, 8, 128, dtype=torch.bfloat16)
    seg = 16 * 8 * 128 * 2
    assert KVLayout.for_vllm_flash(f) == KVLayout(2, seg, seg, 10 * seg)
    assert KVLayout.for_vllm_flash(f).block_bytes == 2 * seg


def test_backend_info_reports_the_active_path():
    info = backend_info()
    expected = "native-cpu" if native.cpu_lib() is not None else "torch"
    assert info["active"] in (expected, "native-cuda")
    assert "errors" in info


def test_doctor_and_plugins_report_the_copy_backend(capsys):
    import json

    from kvcore.cli.main import main

    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["copy_backend"]["active"] == backend_info()["active"]
    assert report["torch"]["installed"] is True
    assert main(["plugins", "--json"]) == 0
    plugins = json.loads(capsys.readouterr().out)
    assert plugins["copy_backend"]["active"] == backend_info()["active"]
    bench = [p for p in plugins["plugins"] if p["module"] == "kvcore.copy.bench"]
    assert bench and not bench[0]["error"]
    assert bench[0]["registers"] == {"settings": ["CopySettings"], "benchmarks": ["copy"]}


def test_fallback_is_chosen_when_native_is_unavailable(tmp_path):
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "from kvcore.copy import KVLayout, gather, backend_info\n"
        "layers = [np.arange(4 * 64, dtype=np.uint8).reshape(4, 64) + i for i in range(2)]\n"
        "layout = KVLayout.for_mla(layers[0].reshape(4, 8, 8))\n"
        "dest = np.zeros(2 * 2 * 64, np.uint8)\n"
        "gather(layers, layout, [3, 1], [dest], 2)\n"
        "assert (dest[:64] == layers[0][3]).all() and (dest[192:] == layers[1][1]).all()\n"
        "print(backend_info()['active'])\n"
    )
    env = {"KVCORE_NATIVE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch"


def test_concurrent_calls_from_threads_are_correct():
    from concurrent.futures import ThreadPoolExecutor

    layers = [np.random.default_rng(i).integers(0, 256, (32, 2, 16, 512), dtype=np.uint8)
              for i in range(4)]
    layout = KVLayout.for_vllm_cpu(layers[0])
    tables = [np.random.default_rng(s).permutation(32)[:24] for s in range(8)]

    def one(ids):
        dests = [np.zeros(layout.chunk_bytes(4, 8), np.uint8) for _ in range(3)]
        gather(layers, layout, ids, dests, 8)
        return dests

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, tables))
    for ids, dests in zip(tables, results):
        for j, d in enumerate(dests):
            want = np.concatenate([t[ids[j * 8 : (j + 1) * 8]].reshape(-1) for t in layers])
            assert np.array_equal(d, want)
