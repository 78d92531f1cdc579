"""Codecs behind a real vLLM engine and a real model: ``kvcore bench codec`` at small sizes.

SmolLM2-135M-Instruct over real text: an exact load reproduces the first token computed without
a hit; every prompt also loads through ``int8``; the TTFT run writes a 4-chunk document into a
real LMDB tier with each codec and reads it back through vLLM (decoded, then from memory). Two
engine starts (about 20 s each) and a few minutes of prefill on this CPU.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest

from kvcore_vllm import bench_codec


@pytest.mark.vllm
def test_codec_bench_on_the_real_model(kvcore_env) -> None:
    from kvcore_vllm.smollm import SmolLMUnavailable, build_smollm

    try:
        build_smollm()
    except SmolLMUnavailable as exc:  # pragma: no cover - `make install` installs it
        pytest.skip(str(exc))
    parser = argparse.ArgumentParser()
    bench_codec.add_arguments(parser)
    args = parser.parse_args([
        "--quality", "--prompts", "3", "--tokens", "8", "--passage-tokens", "200",
        "--codecs", "shuffle-zstd,int8", "--sample-mib", "8", "--repeat", "1",
        "--ttft", "--ttft-tiers", "lmdb", "--ttft-codecs", "none,int8", "--ttft-chunks", "4",
        "--ttft-repeats", "1", "--timeout-s", "900"])
    report = bench_codec.run(args)

    assert report["memcpy_gbps"] > 0 and report["dtype"] == "bfloat16"
    zstd, int8 = report["codecs"]["shuffle-zstd"], report["codecs"]["int8"]
    assert zstd["lossless_verified"] and not zstd["lossy"] and zstd["ratio"] > 1.1
    assert int8["lossy"] and 1.8 < int8["ratio"] < 2.0  # 1 byte + a float32 per 64 of 2 bytes
    assert 0 < int8["relative_rms_error"] < 0.02

    exact = report["exact"]
    assert report["prompt_tokens"] == 257  # one chunk and one token
    assert exact["first_token_equals_fresh"] == 1.0, "an exact load changed the model's output"
    assert exact["loaded_tokens"] == 3 * 256  # every prompt's chunk loaded
    assert int8["loaded_tokens"] == exact["loaded_tokens"]  # loaded through the codec
    assert 0.0 <= int8["token_agreement"] <= 1.0
    assert math.isfinite(int8["perplexity_change"]) and abs(int8["perplexity_change"]) < 0.05
    recomputed = exact["recomputed"]  # the engine's own noise floor: nothing loaded
    assert recomputed["loaded_tokens"] == 0
    assert 0.0 <= recomputed["token_agreement"] <= 1.0
    assert math.isfinite(recomputed["perplexity_change"])

    rows = report["ttft"]["tiers"]["lmdb"]
    for codec, row in rows.items():
        assert row["cached_tokens_min"] == 4 * 256, codec
        assert row["lower_equals_memory_hit"] == 1.0, codec
        assert row["corrupt_chunks"] == 0, codec
    assert rows["none"]["cold_equals_lower_hit"] == 1.0
    assert rows["int8"]["bytes_written"] < 0.6 * rows["int8"]["bytes_stored_raw"]
    assert rows["none"]["bytes_written"] > rows["none"]["bytes_stored_raw"]  # raw + headers


def test_codec_named_builds_group_variants() -> None:
    """``--codecs int8/16``: the built-in quantization with another group size (no engine)."""
    from kvcore.codecs.context import CodecContext
    from kvcore.config import ConfigError
    from kvcore.plugins import get_registry

    context = CodecContext(get_registry())
    variant = bench_codec.codec_named(context, "int8/16")
    assert (variant.name, variant.bits, variant.group) == ("int8/16", 8, 16)
    assert bench_codec.codec_named(context, "int8").group == 64
    values = np.linspace(-3, 3, 512, dtype=np.float32)
    raw = (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()  # bfloat16, truncated
    encoded = variant.encode(memoryview(raw), "bfloat16")
    assert encoded is not None and memoryview(encoded).nbytes == variant.encoded_nbytes(512)
    assert len(bytes(variant.decode(memoryview(encoded).cast("B"), len(raw)))) == len(raw)
    for bad in ("shuffle-zstd/16", "int8/x", "int8/3", "nosuch/8"):
        with pytest.raises(ConfigError, match="--codecs"):
            bench_codec.codec_named(context, bad)
