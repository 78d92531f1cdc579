"""``kvcore bench verify``: how well sampled verification catches wrong KV, on a real engine.

A real vLLM engine (random-weight Llama built here) with kvcore and ``KVCORE_VERIFY_SAMPLE=1``
stores prompts, then asks them again: every would-be hit is recomputed and compared.

- **clean**: ``--clean`` prompts, untouched: every comparison must pass (false positives),
  with the largest difference a recompute showed;
- **faults**: for each fault class, ``--per-fault`` prompts whose chunk 1 is replaced in
  kvcore's memory tier by the bytes that fault leaves (a chunk shifted by one block, two layers
  swapped, another prompt's KV, the same tokens' KV computed over another context, three high
  bits flipped, three random bits flipped): the detection rate per class.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CHUNK = 256
FAULTS = ("shifted-by-a-block", "layers-swapped", "other-prompt", "other-context",
          "high-bits-flipped", "random-bits-flipped")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clean", type=int, default=200, help="clean verified hits")
    parser.add_argument("--per-fault", type=int, default=10, help="prompts per fault class")
    parser.add_argument("--model-dir", default=None, help="where to build the model (cached)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kvcore_vllm.testing import build_tiny_llama

    model_dir = Path(args.model_dir or Path(tempfile.gettempdir()) / "kvcore-bench-llama")
    model = build_tiny_llama(model_dir, layers=4, hidden=1024)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "TOKENIZERS_PARALLELISM": "false",
           "KVCORE_VERIFY_SAMPLE": "1"}
    with tempfile.TemporaryDirectory(prefix="kvcore-verify-") as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec.write_text(json.dumps({"model": str(model), "clean": args.clean,
                                    "per_fault": args.per_fault}))
        proc = subprocess.run([sys.executable, "-m", "kvcore_vllm.bench_verify", str(spec),
                               str(out)], env=env, capture_output=True, text=True, timeout=3000)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"verify bench failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
        return json.loads(out.read_text())


def _faulty(fault: str, good: bytes, nxt: bytes, other: bytes, other_ctx: bytes, layers: int,
            k: int, rng: random.Random) -> bytes:
    layer = len(good) // layers
    block = layer // k
    if fault == "shifted-by-a-block":
        return b"".join(good[i * layer + block:(i + 1) * layer] + nxt[i * layer:i * layer + block]
                        for i in range(layers))
    if fault == "layers-swapped":
        return good[layer:2 * layer] + good[:layer] + good[2 * layer:]
    if fault == "other-prompt":
        return other
    if fault == "other-context":
        return other_ctx
    arr = bytearray(good)
    for _ in range(3):
        if fault == "high-bits-flipped":  # a sign or exponent bit of a bf16 element
            arr[rng.randrange(len(arr) // 2) * 2 + 1] ^= 1 << rng.randrange(7)
        else:
            arr[rng.randrange(len(arr))] ^= 1 << rng.randrange(8)
    return bytes(arr)


def _child(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    from kvcore.keys import NAMESPACE_BYTES
    from kvcore_vllm import runtime
    from kvcore_vllm.testing import drain, random_prompt
    from kvcore_vllm.verify import live_verifiers

    spec = json.loads(Path(spec_path).read_text())
    llm = LLM(model=spec["model"], skip_tokenizer_init=True, enforce_eager=True,
              max_model_len=4096, max_num_batched_tokens=4096, seed=0,
              kv_cache_memory_bytes=1 << 30,
              kv_transfer_config=KVTransferConfig(kv_connector="KVCoreConnector",
                                                  kv_role="kv_both"))
    once = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False)

    def generate(prompts: list[list[int]]) -> None:
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], once, use_tqdm=False)
        runtime.flush_all()
        drain(llm)  # vLLM frees the blocks kvcore's stores held: its prefix cache can reset

    def reset() -> None:
        if not llm.reset_prefix_cache():
            raise RuntimeError("vLLM kept its prefix cache: the hits would not come from kvcore")

    with runtime._lock:
        engine = next(e for e, _ in runtime._engines.values())
    (verifier,) = live_verifiers()

    def count(name: str) -> float:
        return sum(engine.metrics.snapshot()["counters"].get(name, {}).values())

    def settle(expected: float) -> None:
        deadline = time.monotonic() + 60
        while count("verify_chunks_total") < expected and time.monotonic() < deadline:
            time.sleep(0.01)
        verifier.flush(30.0)
        engine.flush(30.0)

    # Clean: store in batches of 8 (batched prefill), verify one by one.
    clean = [random_prompt(2 * CHUNK + 1, seed=1000 + i) for i in range(spec["clean"])]
    for i in range(0, len(clean), 8):
        generate(clean[i:i + 8])
    reset()
    for prompt in clean:
        generate([prompt])
    settle(2 * len(clean))
    result: dict[str, Any] = {
        "clean_hits": len(clean),
        "clean_chunks": count("verify_chunks_total"),
        "clean_exact": count("verify_exact_total"),
        "clean_within_tolerance": count("verify_within_tolerance_total"),
        "clean_false_positives": count("verify_mismatch_total"),
        "largest_clean_difference": verifier.worst_accepted,
        "tolerance": verifier.tolerance,
        "faults": {},
    }
    reset()
    rng = random.Random(3)
    k = CHUNK // 128  # vLLM CPU blocks of 128 tokens
    seed = 5000
    for fault in FAULTS:
        detected = 0
        for _ in range(spec["per_fault"]):
            seed += 1
            prompt = random_prompt(3 * CHUNK + 1, seed=seed)
            twin = random_prompt(CHUNK, seed=seed + 100_000) + prompt[CHUNK:]
            generate([prompt, twin])
            digest = next(iter(engine.memory.iter_keys()))[:NAMESPACE_BYTES]
            keys = engine.keys_for(digest, prompt)
            twin_keys = engine.keys_for(digest, twin)
            good, nxt = _read(engine, keys[1]), _read(engine, keys[2])
            other, other_ctx = _read(engine, twin_keys[0]), _read(engine, twin_keys[1])
            bad = _faulty(fault, good, nxt, other, other_ctx, 4, k, rng)
            engine.delete([keys[1]])
            engine.store_buffers([keys[1]], [bad]).wait()
            before = count("verify_mismatch_total")
            checked = count("verify_chunks_total")
            reset()
            generate([prompt])
            settle(checked + 3)
            detected += count("verify_mismatch_total") > before
            repaired = _read(engine, keys[1]) != bad
            assert repaired or count("verify_mismatch_total") == before
        result["faults"][fault] = {"prompts": spec["per_fault"],
                                   "detection_rate": detected / spec["per_fault"]}
    Path(out_path).write_text(json.dumps(result))


def _read(engine: Any, key: bytes) -> bytes:
    (view,) = engine.memory.acquire([key])
    if view is None:
        raise RuntimeError("chunk not in the CPU tier")
    try:
        return bytes(view)
    finally:
        engine.memory.release([view])


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
