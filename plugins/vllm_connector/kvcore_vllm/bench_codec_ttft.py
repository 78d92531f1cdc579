"""``kvcore bench codec --ttft``: time to first token of an 8K-token hit, per tier and codec.

One real vLLM engine with SmolLM2-135M-Instruct and kvcore, tiers ``cpu`` and the lower tiers of
``--ttft-tiers`` (LMDB, and Redis on a redis-server the bench starts). For each document of real
text (whole chunks plus one token, 7,937 tokens by default; a short one before them only warms up):

- **cold**: computed and stored once (a prefill of 8K tokens takes minutes on this CPU, so it
  is not repeated per codec);
- then for each tier and each codec (``none`` first): the document's chunks are removed from
  every lower tier and written into this one through the engine's own lower-tier path with that
  codec (what write-behind does with ``KVCORE_<TIER>_CODEC`` set: the bench sets the tier's
  codec between measurements), kvcore's memory tier and vLLM's prefix cache are emptied, and
  the prompt is asked: **lower hit**, every chunk read from the tier, verified and decoded;
  then vLLM's prefix cache is emptied again: **memory hit**, the chunks now in kvcore's memory
  tier (raw bytes whatever the codec).

Each figure is the median over ``--ttft-repeats`` documents; the first tokens are compared
(the cold run's with the lower hit's: equal without a lossy codec; the lower hit's with the
memory hit's: always equal). ``lower_hit_vs_none`` and ``memory_hit_vs_none`` divide by the
``none`` figure of the same tier, measured in the same engine, interleaved.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kvcore_vllm.bench_stall import TierEnv


def run(args: argparse.Namespace, model: Path, documents: list[list[int]]) -> dict[str, Any]:
    """TTFT figures per tier and codec for ``documents`` (token ids; the first warms up)."""
    tiers = [t for t in args.ttft_tiers.split(",") if t]
    codecs = [c for c in args.ttft_codecs.split(",") if c]
    if codecs[:1] != ["none"]:
        raise SystemExit("--ttft-codecs: start with none (the baseline of the ratios)")
    if len(documents) < 2:
        raise SystemExit("--ttft-repeats: at least 1 (the first document only warms up)")
    env = {"KVCORE_TIERS": ",".join(["cpu", *tiers]), "KVCORE_CPU_SIZE": "3GiB"}
    with contextlib.ExitStack() as stack:
        for tier in tiers:  # a fresh store of each (redis-server started for redis)
            env.update({k: v for k, v in stack.enter_context(TierEnv(tier)).items()
                        if k != "KVCORE_TIERS" and k != "KVCORE_CPU_SIZE"})
        measured = _child_run(model, documents, tiers, codecs, env, args.timeout_s)
    report: dict[str, Any] = {"document_tokens": len(documents[1]),
                              "repeats": len(documents) - 1, "tiers": {}}
    for tier in tiers:
        rows = {}
        for codec in codecs:
            row = measured[f"{tier}:{codec}"]
            rows[codec] = {
                **{name: statistics.median(row[name]) for name in ("lower_hit_s", "memory_hit_s")},
                "cold_s": statistics.median(measured["cold_s"]),
                **{name: sum(row[name]) / len(row[name])
                   for name in ("cold_equals_lower_hit", "lower_equals_memory_hit")},
                "cached_tokens_min": min(row["cached_tokens"]),
                "bytes_written": sum(row["bytes_written"]),
                "bytes_stored_raw": sum(row["bytes_raw"]),
                "corrupt_chunks": sum(row["corrupt_chunks"]),
            }
        for row in rows.values():
            row["lower_hit_vs_none"] = row["lower_hit_s"] / rows["none"]["lower_hit_s"]
            row["memory_hit_vs_none"] = row["memory_hit_s"] / rows["none"]["memory_hit_s"]
        report["tiers"][tier] = rows
    return report


def _child_run(model: Path, documents: list[list[int]], tiers: list[str], codecs: list[str],
               env: dict[str, str], timeout_s: float) -> dict[str, Any]:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("KVCORE_")}
    child_env.update(env, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_NUM_OF_RESERVED_CPU="1",
                     TOKENIZERS_PARALLELISM="false", KVCORE_VERIFY_SAMPLE="0",
                     KVCORE_CHUNK_SIZE=os.environ.get("KVCORE_CHUNK_SIZE", "256"))
    with tempfile.TemporaryDirectory(prefix="kvcore-ttft-") as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec.write_text(json.dumps({"model": str(model), "documents": documents,
                                    "tiers": tiers, "codecs": codecs}))
        proc = subprocess.run([sys.executable, "-m", "kvcore_vllm.bench_codec_ttft", str(spec),
                               str(out)], env=child_env, capture_output=True, text=True,
                              timeout=timeout_s)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"TTFT run failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def _child(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    from kvcore_vllm import runtime
    from kvcore_vllm.testing import drain, reset_prefix_cache

    spec = json.loads(Path(spec_path).read_text())
    documents: list[list[int]] = spec["documents"]
    n = max(len(d) for d in documents)
    llm = LLM(model=spec["model"], skip_tokenizer_init=True, enforce_eager=True,
              max_model_len=n + 16, max_num_batched_tokens=n + 16, seed=0,
              kv_cache_memory_bytes=1 << 30,
              kv_transfer_config=KVTransferConfig(kv_connector="KVCoreConnector",
                                                  kv_role="kv_both"))
    once = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False)
    with runtime._lock:
        engine = next(e for e, _ in runtime._engines.values())
    lowers = {lower.name: lower for lower in engine.lower}

    def generate(prompt: list[int]) -> tuple[float, int, int]:
        started = time.perf_counter()
        (out,) = llm.generate([TokensPrompt(prompt_token_ids=prompt)], once, use_tqdm=False)
        seconds = time.perf_counter() - started
        runtime.flush_all(120)
        drain(llm)
        engine.flush(120)
        return seconds, out.outputs[0].token_ids[0], int(out.num_cached_tokens or 0)

    def counter(name: str) -> float:
        return sum(engine.metrics.snapshot()["counters"].get(name, {}).values())

    def written() -> float:
        return counter("bytes_written_total")

    def corrupt() -> float:
        return counter("corrupt_chunks_total")

    result: dict[str, Any] = {"cold_s": []}
    for i, doc in enumerate(documents):  # the first (short) document warms every path up
        before = set(engine.memory.iter_keys())
        cold, cold_token, _ = generate(doc)
        new = [k for k in engine.memory.iter_keys() if k not in before]
        held = [(k, bytes(v)) for k, v in zip(new, engine.memory.get(new)) if v is not None]
        keys, raw = [k for k, _ in held], [v for _, v in held]
        if i:
            result["cold_s"].append(cold)
        for tier in spec["tiers"]:
            for name in spec["codecs"]:
                # the document only in ``tier``, written as that codec's write-behind writes it
                for lower in lowers.values():
                    lower.tier.delete(keys)
                lower = lowers[tier]
                lower.codec = engine.codecs.configured(name, "--ttft-codecs")
                start_written, start_corrupt = written(), corrupt()
                items = [(k, memoryview(v)) for k, v in held]
                if lower.put(items, engine.chunk_size) != len(keys):
                    raise RuntimeError(f"{tier} refused chunks")
                engine.clear(tier="cpu")
                reset_prefix_cache(llm)
                lower_s, lower_token, lower_cached = generate(doc)
                reset_prefix_cache(llm)
                memory_s, memory_token, _ = generate(doc)
                if not i:
                    continue
                row = result.setdefault(f"{tier}:{name}", {
                    "lower_hit_s": [], "memory_hit_s": [], "cold_equals_lower_hit": [],
                    "lower_equals_memory_hit": [], "cached_tokens": [], "bytes_written": [],
                    "bytes_raw": [], "corrupt_chunks": []})
                row["lower_hit_s"].append(lower_s)
                row["memory_hit_s"].append(memory_s)
                row["cold_equals_lower_hit"].append(cold_token == lower_token)
                row["lower_equals_memory_hit"].append(lower_token == memory_token)
                row["cached_tokens"].append(lower_cached)
                row["bytes_written"].append(written() - start_written)
                row["bytes_raw"].append(sum(map(len, raw)))
                row["corrupt_chunks"].append(corrupt() - start_corrupt)
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
