"""Chunk codecs: the encoded frame, the built-in codecs (native and numpy bit-identical), and the
engine's lower-tier path (encode on write-behind, verify and decode on load, misses for what is
corrupt, foreign or encoded by a codec not installed here)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcore import chunk_format
from kvcore.codecs import native
from kvcore.codecs.quantize import HEAD, GroupQuantCodec
from kvcore.codecs.shuffle import ShuffleZstdCodec
from kvcore.config import ConfigError, load_settings
from kvcore.engine import CacheEngine
from kvcore.eviction.lru import LRUPolicy
from kvcore.hookspecs import hookimpl
from kvcore.interfaces import CodecError
from kvcore.keys import Namespace, chunk_keys
from kvcore.plugins import PluginRegistry
from kvcore.tiers.cpu import CpuTier

CHUNK = 16
KEY = chunk_keys(Namespace("codec-test"), range(CHUNK), CHUNK)[0]


def bf16(values: np.ndarray) -> np.ndarray:
    """float32 values truncated to bfloat16, as bytes."""
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)


def kv_like(n: int, seed: int = 0) -> np.ndarray:
    """bfloat16 values shaped like KV: per-channel scales, a few outliers."""
    rng = np.random.default_rng(seed)
    scale = np.repeat(rng.uniform(0.05, 8.0, size=max(1, n // 64 + 1)), 64)[:n]
    values = rng.standard_normal(n) * scale
    values[rng.integers(0, n, size=max(1, n // 500))] *= 20
    return bf16(values)


# -- the frame -------------------------------------------------------------------------------

def test_coded_frame_round_trip_and_old_readers_refuse_it() -> None:
    parts = chunk_format.encode_coded(KEY, "int8", b"encoded-bytes", 1000, tokens=CHUNK)
    blob = b"".join(bytes(p) for p in parts)
    frame = chunk_format.open_frame(KEY, blob)
    assert frame is not None and frame.codec == "int8" and frame.raw_nbytes == 1000
    assert bytes(frame.data) == b"encoded-bytes"
    assert chunk_format.decode(KEY, blob) is None  # a raw-only reader: a miss, never garbage
    assert not chunk_format.matches(KEY, blob[:chunk_format.HEADER_BYTES],
                                    blob[chunk_format.HEADER_BYTES:])
    raw = b"".join(bytes(p) for p in chunk_format.encode(KEY, b"raw", CHUNK))
    found = chunk_format.open_frame(KEY, raw)
    assert found is not None and found.codec == "none" and bytes(found.data) == b"raw"
    with pytest.raises(ValueError, match="codec name"):
        chunk_format.encode_coded(KEY, "none", b"x", 1)


@settings(max_examples=80, deadline=None)
@given(st.binary(min_size=1, max_size=300), st.data())
def test_any_flipped_byte_of_a_coded_frame_is_detected(payload: bytes,
                                                       data: st.DataObject) -> None:
    blob = bytearray(b"".join(bytes(p) for p in
                              chunk_format.encode_coded(KEY, "shuffle-zstd", payload, 4096)))
    i = data.draw(st.integers(0, len(blob) - 1))
    blob[i] ^= data.draw(st.integers(1, 255))
    assert chunk_format.open_frame(KEY, bytes(blob)) is None


# -- the quantizers ----------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group", [(8, 64), (4, 32)])
@pytest.mark.parametrize("count", [1, 63, 64, 65, 1001, 50_000])
def test_native_and_numpy_quantizers_are_bit_identical(bits: int, group: int,
                                                       count: int) -> None:
    if not native.available():
        pytest.fail("the native library is not built (make install builds it)")
    codec = GroupQuantCodec("q", bits, group)
    raw = kv_like(count, seed=count)
    raw[:2] = 0  # a zero element; with count 1 a zero group
    encoded = np.frombuffer(bytes(codec.encode(memoryview(raw), "bfloat16")), np.uint8)
    groups = math.ceil(count / group)
    scales = np.empty(groups, np.float32)
    values = np.empty(encoded.nbytes - HEAD.size - 4 * groups, np.uint8)
    assert codec._encode_numpy(raw, "bfloat16", scales, values)
    assert encoded[HEAD.size:HEAD.size + 4 * groups].view(np.float32).tobytes() == scales.tobytes()
    assert encoded[HEAD.size + 4 * groups:].tobytes() == values.tobytes()
    native_out = np.frombuffer(codec.decode(memoryview(encoded), raw.nbytes), np.uint8)
    numpy_out = np.empty(raw.nbytes, np.uint8)
    codec._decode_numpy(values, scales, count, "bfloat16", numpy_out)
    assert native_out.tobytes() == numpy_out.tobytes()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_int8_error_is_within_half_a_step_of_each_group(dtype: str) -> None:
    codec = GroupQuantCodec("int8", 8, 64)
    rng = np.random.default_rng(1)
    values = (rng.standard_normal(64 * 100) * 4).astype(np.float32)
    raw = bf16(values) if dtype == "bfloat16" else values.astype(np.float16).view(np.uint8)
    exact = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32) \
        if dtype == "bfloat16" else raw.view(np.float16).astype(np.float32)
    encoded = codec.encode(memoryview(raw), dtype)
    assert encoded is not None and len(encoded) < raw.nbytes * 0.6
    out = np.frombuffer(codec.decode(memoryview(encoded).cast("B"), raw.nbytes), np.uint8)
    got = (out.view(np.uint16).astype(np.uint32) << 16).view(np.float32) \
        if dtype == "bfloat16" else out.view(np.float16).astype(np.float32)
    step = np.abs(exact.reshape(-1, 64)).max(axis=1) / 127
    rounding = np.abs(exact.reshape(-1, 64)) * (2.0 ** -8 if dtype == "bfloat16" else 2.0 ** -11)
    err = np.abs(got - exact).reshape(-1, 64)
    assert (err <= step[:, None] / 2 + rounding + 1e-6).all()
    assert err.max() > 0  # lossy: not a copy


def test_groups_of_tiny_values_quantize_to_zero_in_both_paths() -> None:
    codec = GroupQuantCodec("int8", 8, 64)
    values = np.full(128, 1e-38, np.float32)
    values[64:] = 3.0
    raw = bf16(values)
    encoded = np.frombuffer(bytes(codec.encode(memoryview(raw), "bfloat16")), np.uint8)
    scales = np.empty(2, np.float32)
    quantized = np.empty(128, np.uint8)
    assert codec._encode_numpy(raw, "bfloat16", scales, quantized)
    assert encoded[HEAD.size:HEAD.size + 8].view(np.float32).tolist() == scales.tolist()
    assert scales[0] == 0 and encoded[HEAD.size + 8:].tobytes() == quantized.tobytes()
    out = np.frombuffer(codec.decode(memoryview(encoded), raw.nbytes), np.uint8)
    assert not out[:128].any() and out[128:].tobytes() == raw[128:].tobytes()


def test_quantizers_store_raw_what_they_cannot_encode() -> None:
    codec = GroupQuantCodec("int8", 8, 64)
    values = np.ones(256, np.float32)
    values[5] = np.nan
    assert codec.encode(memoryview(bf16(values)), "bfloat16") is None
    values[5] = np.inf
    assert codec.encode(memoryview(bf16(values)), "bfloat16") is None
    assert codec.encode(memoryview(np.zeros(64, np.uint8)), "float8_e4m3fn") is None
    assert codec.encode(memoryview(np.zeros(3, np.uint8)), "bfloat16") is None


def test_quantizer_refuses_foreign_or_inconsistent_data() -> None:
    codec = GroupQuantCodec("int8", 8, 64)
    raw = kv_like(640)
    good = bytearray(codec.encode(memoryview(raw), "bfloat16"))  # type: ignore[arg-type]
    cases = {
        "short": bytes(good[:10]),
        "magic": b"XX" + bytes(good[2:]),
        "truncated": bytes(good[:-1]),
        "other codec": bytes(GroupQuantCodec("int4", 4, 32).encode(  # type: ignore[arg-type]
            memoryview(raw), "bfloat16")),
    }
    negative = bytearray(good)
    negative[HEAD.size + 3] |= 0x80  # the first scale's sign bit
    cases["negative scale"] = bytes(negative)
    for what, blob in cases.items():
        with pytest.raises(CodecError):
            codec.decode(memoryview(blob), raw.nbytes)
        assert what
    with pytest.raises(CodecError, match="elements"):
        codec.decode(memoryview(bytes(good)), raw.nbytes * 2)  # claims another raw length


def test_shuffle_zstd_is_lossless_and_refuses_garbage() -> None:
    codec = ShuffleZstdCodec()
    raw = kv_like(100_000)
    encoded = codec.encode(memoryview(raw), "bfloat16")
    assert encoded is not None and len(encoded) < raw.nbytes
    assert bytes(codec.decode(memoryview(encoded).cast("B"), raw.nbytes)) == raw.tobytes()
    with pytest.raises(CodecError, match="header says"):
        codec.decode(memoryview(encoded).cast("B"), raw.nbytes + 2)
    with pytest.raises(CodecError):
        codec.decode(memoryview(b"\x00" * 40), 100)
    assert codec.encode(memoryview(np.random.default_rng(0).integers(
        0, 255, 4096, dtype=np.uint8)), "uint8") is None  # incompressible: stored raw


# -- the engine's lower-tier path --------------------------------------------------------------

def engine_with(codec: str, registry: PluginRegistry | None = None) -> tuple[CacheEngine, object]:
    from kvcore_example_tier import DictTier  # the documented example plugin (a dict)

    lower = DictTier(64 << 20, LRUPolicy())
    lower.name = "disk"
    lower.codec = codec
    engine = CacheEngine(load_settings(chunk_size=CHUNK), registry=registry,
                         tiers=[CpuTier(64 << 20, LRUPolicy())])
    engine.add_lower_tier(lower)
    return engine, lower


def stored_frames(lower: object) -> dict[bytes, bytes]:
    keys = list(lower.iter_keys())  # type: ignore[attr-defined]
    return {k: bytes(v) for k, v in zip(keys, lower.get(keys))}  # type: ignore[attr-defined]


@pytest.mark.parametrize("codec,lossy", [("shuffle-zstd", False), ("int8", True),
                                         ("int4", True)])
def test_engine_encodes_below_memory_and_loads_verified(codec: str, lossy: bool) -> None:
    engine, lower = engine_with(codec)
    try:
        ns = Namespace("codec-model", dtype="bfloat16")
        keys = engine.keys_for(ns, range(4 * CHUNK))
        payloads = [kv_like(8192, seed=i).tobytes() for i in range(4)]
        assert engine.store_buffers(keys, payloads).wait(5) == 4
        assert engine.flush(10)
        frames = stored_frames(lower)
        assert len(frames) == 4
        for key in keys:
            frame = chunk_format.open_frame(key, frames[key])
            assert frame is not None and frame.codec == codec
            assert len(frames[key]) < len(payloads[0])
        assert engine.metrics.get("bytes_written_total", "disk") < 4 * len(payloads[0])
        engine.clear(tier="cpu")
        with engine.acquire(keys) as lease:
            loaded = [bytes(v) for v in lease.views]
        assert len(loaded) == 4
        for key, got, sent in zip(keys, loaded, payloads):
            if not lossy:
                assert got == sent
            else:
                assert got != sent
                expected = engine.codecs.as_loaded(key, np.frombuffer(sent, np.uint8))
                assert got == expected.tobytes()  # what a verifier compares with
        assert engine.codecs.loaded_codec(keys[0]) == (codec if lossy else None)
        engine.clear(tier="cpu")
        assert engine.store_buffers(keys[:1], payloads[:1]).wait(5) == 1
        assert engine.codecs.loaded_codec(keys[0]) is None  # stored afresh: exact again
    finally:
        engine.close()


def test_chunks_of_an_unknown_namespace_are_stored_raw() -> None:
    engine, lower = engine_with("int8")
    try:
        keys = chunk_keys(Namespace("digest-only"), range(CHUNK), CHUNK)  # never noted
        assert engine.store_buffers(keys, [kv_like(4096).tobytes()]).wait(5) == 1
        assert engine.flush(10)
        frame = chunk_format.open_frame(keys[0], stored_frames(lower)[keys[0]])
        assert frame is not None and frame.codec == "none"
    finally:
        engine.close()


def test_corrupt_and_uninstalled_codec_frames_are_misses() -> None:
    engine, lower = engine_with("int8")
    try:
        ns = Namespace("codec-miss", dtype="bfloat16")
        keys = engine.keys_for(ns, range(2 * CHUNK))
        payload = kv_like(4096).tobytes()
        unknown = chunk_format.encode_coded(keys[0], "from-elsewhere", b"abc", len(payload))
        assert lower.put([(keys[0], unknown)]) == [True]  # type: ignore[attr-defined]
        # well framed (the checksum verifies) but not int8 data: corrupt, deleted
        lying = chunk_format.encode_coded(keys[1], "int8", b"\x00" * 64, len(payload))
        assert lower.put([(keys[1], lying)]) == [True]  # type: ignore[attr-defined]
        with engine.acquire(keys) as lease:
            assert len(lease) == 0
        assert engine.metrics.get("corrupt_chunks_total", "disk") == 1
        assert lower.contains(keys) == [True, False]  # type: ignore[attr-defined]
        assert engine.lookup(keys).chunks == 0  # kept, but no longer a hit for this engine
    finally:
        engine.close()


def test_unknown_codec_setting_names_the_variable() -> None:
    from kvcore_example_tier import DictTier

    lower = DictTier(1 << 20, LRUPolicy())
    lower.name = "lmdb"
    lower.codec = "zip9"
    engine = CacheEngine(load_settings(chunk_size=CHUNK), tiers=[CpuTier(1 << 20, LRUPolicy())])
    try:
        with pytest.raises(ConfigError, match="KVCORE_LMDB_CODEC: unknown codec 'zip9'"):
            engine.add_lower_tier(lower)
    finally:
        engine.close()


def test_a_third_party_codec_plugs_in_and_a_missing_library_is_named() -> None:
    from kvcore.interfaces import Codec

    class Reverse(Codec):
        name = "reverse"

        def encode(self, raw, dtype):  # type: ignore[no-untyped-def]
            return bytes(raw)[::-1][1:] if raw.nbytes > 1 else None  # drops the last byte

        def decode(self, encoded, raw_nbytes):  # type: ignore[no-untyped-def]
            return bytes(encoded)[::-1] + b"\x00"

    class Plugin:
        @staticmethod
        @hookimpl
        def kvcore_register_codecs(register):  # type: ignore[no-untyped-def]
            register("reverse", Reverse)
            register("needs-lib", lambda: __import__("kvcore_no_such_library"))

    registry = PluginRegistry().load(allow=[])
    registry.register_module(Plugin, "third-party-codec")
    assert {"reverse", "needs-lib", "int8", "shuffle-zstd"} <= set(registry.codecs)
    engine, lower = engine_with("reverse", registry)
    try:
        keys = engine.keys_for(Namespace("rev"), range(CHUNK))
        payload = bytes(range(200)) + b"\x00"
        assert engine.store_buffers(keys, [payload]).wait(5) == 1
        assert engine.flush(10)
        assert chunk_format.open_frame(keys[0], stored_frames(lower)[keys[0]]).codec == "reverse"
        engine.clear(tier="cpu")
        with engine.acquire(keys) as lease:
            assert [bytes(v) for v in lease.views] == [payload]
    finally:
        engine.close()
    with pytest.raises(ConfigError, match=r"KVCORE_X_CODEC=needs-lib: needs "
                                          r"kvcore_no_such_library; pip install"):
        engine.codecs.configured("needs-lib", "KVCORE_X_CODEC")


def test_doctor_reports_each_codec() -> None:
    from kvcore.cli.doctor_cmd import codec_info

    info = codec_info()
    assert info["codecs"]["int8"] == info["codecs"]["shuffle-zstd"] == "ok"
    assert info["native_quantization"] is native.available()


@pytest.mark.parametrize("codec,exported", [("int8", 0), ("shuffle-zstd", 2)])
def test_export_stops_at_lossy_chunks(codec: str, exported: int) -> None:
    from kvcore.control.commands import read_leading

    engine, _lower = engine_with(codec)
    try:
        keys = engine.keys_for(Namespace("export", dtype="bfloat16"), range(2 * CHUNK))
        payloads = [kv_like(4096, seed=i).tobytes() for i in range(2)]
        assert engine.store_buffers(keys, payloads).wait(5) == 2
        assert engine.flush(10)
        assert len(read_leading(engine, "cpu", keys)) == 2  # fresh in memory: exact
        assert len(read_leading(engine, "disk", keys)) == exported
        engine.clear(tier="cpu")
        with engine.acquire(keys) as lease:
            assert len(lease) == 2  # loads work either way
        assert len(read_leading(engine, "cpu", keys)) == exported
    finally:
        engine.close()
