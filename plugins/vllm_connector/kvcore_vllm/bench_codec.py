"""``kvcore bench codec``: what each chunk codec saves and costs, on real KV of a real model.

The KV is SmolLM2-135M-Instruct's (:mod:`kvcore_vllm.smollm`), computed by a real vLLM engine
with kvcore over real English text (the Python reference documentation every CPython ships in
``pydoc_data.topics``), and taken from kvcore's memory tier exactly as the tiers below it get it.

- Default: per codec, the compression ratio and encode / decode GB/s on one core (each codec
  runs one thread), and memcpy GB/s of the same chunks in the same run (the baseline).
- ``--quality``: one engine (tier ``cpu``). It computes and stores ``--prompts`` chat prompts
  and a held-out passage's head; then, for ``none`` (exact) and each lossy codec, it puts every
  stored chunk back into memory as a load through that codec gives it (the codec's
  deterministic round trip), empties vLLM's prefix cache and measures ``token_agreement``
  (teacher-forced top tokens over the exact run's ``--tokens`` greedy tokens, equal to the
  exact load's), ``free_running_agreement`` (greedy tokens generated freely) and
  ``perplexity_change`` (the held-out passage's continuation). ``exact.recomputed`` gives the
  same figures with nothing loaded at all: the engine's own numerical noise, the floor any
  codec's agreement is read against. ``--codecs int8/16`` compares another group size.

    kvcore bench codec [--json]
    kvcore bench codec --quality [--prompts 100] [--tokens 64] [--codecs int8,int4] [--json]
    kvcore bench codec --ttft [--ttft-tiers lmdb,redis] [--json]

``--ttft`` adds the end-to-end figures of :mod:`kvcore_vllm.bench_codec_ttft`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

CODECS = ("shuffle-zstd", "int8", "int4")
HELD_OUT_PREFIX = 1024
HELD_OUT_EVAL = 256
SYSTEM = "You are a helpful assistant who explains Python clearly."
ASK = "Read this passage from the Python documentation, then explain what it says:\n\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quality", action="store_true",
                        help="also measure greedy token agreement and perplexity change")
    parser.add_argument("--prompts", type=int, default=100, help="prompts (--quality)")
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt")
    parser.add_argument("--passage-tokens", type=int, default=200,
                        help="tokens of documentation text in each prompt")
    parser.add_argument("--sample-mib", type=float, default=32.0,
                        help="KV bytes the throughput figures are measured on")
    parser.add_argument("--codecs", default=",".join(CODECS),
                        help="comma-separated codecs to measure")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many timings")
    parser.add_argument("--ttft", action="store_true",
                        help="also measure the TTFT of a long hit from each lower tier, per codec")
    parser.add_argument("--ttft-tiers", default="lmdb,redis", help="lower tiers for --ttft")
    parser.add_argument("--ttft-codecs", default="none,shuffle-zstd,int8,int4",
                        help="codecs for --ttft, none first")
    parser.add_argument("--ttft-chunks", type=int, default=31,
                        help="chunks of each --ttft document (plus one token; 31: 7,937 tokens)")
    parser.add_argument("--ttft-repeats", type=int, default=3, help="documents per --ttft run")
    parser.add_argument("--timeout-s", type=float, default=3000.0)


# -- real text ---------------------------------------------------------------------------------

def documentation_tokens(tokenizer: Any) -> list[int]:
    """Token ids of the Python reference documentation topics, in a fixed order."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name].strip() for name in sorted(topics))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_prompts(tokenizer: Any, count: int, passage_tokens: int, chunk: int
                  ) -> tuple[list[list[int]], list[int]]:
    """``count`` chat prompts, each over its own passage and each a whole number of chunks plus
    one token long (a hit loads every chunk and computes one token), and a held-out text from
    the end of the documentation (no prompt contains it)."""
    ids = documentation_tokens(tokenizer)
    held_out = ids[-(HELD_OUT_PREFIX + HELD_OUT_EVAL):]
    body = ids[: len(ids) - len(held_out)]
    marker = "\x00PASSAGE\x00"
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": ASK + marker}]
    template = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False)
    head_text, tail_text = template.split(marker)
    head = list(tokenizer(head_text, add_special_tokens=False)["input_ids"])
    tail = list(tokenizer(tail_text, add_special_tokens=False)["input_ids"])
    total = -(-(len(head) + passage_tokens + len(tail)) // chunk) * chunk + 1
    size = total - len(head) - len(tail)
    if count * size > len(body):
        raise SystemExit(f"--prompts {count} x --passage-tokens {passage_tokens} needs more "
                         f"than the {len(body)} tokens of text available")
    prompts = [head + body[i * size:(i + 1) * size] + tail for i in range(count)]
    return prompts, held_out


# -- the parent ----------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from kvcore_vllm.smollm import build_smollm

    model = build_smollm()
    codecs = [c for c in args.codecs.split(",") if c]
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    count = args.prompts if args.quality else 8
    chunk = int(os.environ.get("KVCORE_CHUNK_SIZE", "256"))
    prompts, held_out = build_prompts(tokenizer, count, args.passage_tokens, chunk)
    with tempfile.TemporaryDirectory(prefix="kvcore-codec-") as tmp:
        samples = Path(tmp) / "samples.bin"
        engine = _engine_run(model, codecs if args.quality else [], prompts, held_out, args,
                             samples, Path(tmp))
        chunks = _read_samples(samples, engine["sample_chunk_bytes"])
    report = throughput(chunks, codecs, engine["dtype"], args.repeat)
    report.update(model="SmolLM2-135M-Instruct",
                  text="pydoc_data.topics (Python reference documentation)",
                  sample_chunks=len(chunks), chunk_bytes=engine["sample_chunk_bytes"])
    if args.quality:
        runs = engine["runs"]
        exact = runs["none"]
        report.update(prompts=len(prompts), prompt_tokens=len(prompts[0]),
                      tokens_per_prompt=args.tokens, seconds=engine["seconds"])
        report["exact"] = {
            "first_token_equals_fresh": _agreement(
                [[o[0]] for o in exact["outputs"]], [[t] for t in engine["fresh_first"]])[0],
            "forced_top1_equals_greedy": _agreement(exact["outputs"], exact["forced_top1"])[0],
            "loaded_tokens": exact["loaded_tokens"],
            "held_out": exact["held_out"],
        }
        # the engine's own noise: the same figures with every prefix recomputed
        report["exact"]["recomputed"] = quality(exact, engine["recompute"])
        for name in codecs:
            if name in runs:
                report["codecs"][name].update(quality(exact, runs[name]))
    if args.ttft:
        from kvcore_vllm import bench_codec_ttft

        text = documentation_tokens(tokenizer)
        n = args.ttft_chunks * chunk + 1
        warmup = text[-(2 * chunk + 1):]  # two chunks: every path runs once before measuring
        documents = [warmup] + [text[i * n:(i + 1) * n] for i in range(args.ttft_repeats)]
        report["ttft"] = bench_codec_ttft.run(args, model, documents)
    return report


def codec_named(context: Any, name: str) -> Any:
    """The codec ``--codecs`` names: a registered name, or ``int8/G`` / ``int4/G`` for the
    built-in group quantization with groups of ``G`` elements (to compare group sizes)."""
    from kvcore.codecs.quantize import GroupQuantCodec
    from kvcore.config import ConfigError

    base, _, group = name.partition("/")
    codec = context.configured(base, "--codecs")
    if not group:
        return codec
    if not isinstance(codec, GroupQuantCodec) or not group.isdigit():
        raise ConfigError(f"--codecs {name}: a group size applies to int8 or int4 only")
    try:
        return GroupQuantCodec(name, codec.bits, int(group))
    except ValueError as exc:
        raise ConfigError(f"--codecs {name}: {exc}") from exc


def _agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """Fraction of positions with equal tokens, and of sequences equal throughout."""
    same = total = whole = 0
    for x, y in zip(a, b):
        same += sum(p == q for p, q in zip(x, y))
        total += max(len(x), len(y))
        whole += x == y
    return (same / total if total else 0.0), (whole / len(a) if a else 0.0)


def quality(exact: dict[str, Any], lossy: dict[str, Any]) -> dict[str, Any]:
    """A lossy codec's figures against exact loads: same prompts, same passes, same engine."""
    token_agreement, _ = _agreement(exact["forced_top1"], lossy["forced_top1"])
    free, identical = _agreement(exact["outputs"], lossy["outputs"])
    return {
        "token_agreement": token_agreement,
        "free_running_agreement": free,
        "prompts_identical": identical,
        "perplexity": lossy["held_out"]["perplexity"],
        "perplexity_change": (lossy["held_out"]["perplexity"]
                              / exact["held_out"]["perplexity"] - 1.0),
        "loaded_tokens": lossy["loaded_tokens"],
    }


def _engine_run(model: Path, codecs: list[str], prompts: list[list[int]], held_out: list[int],
                args: argparse.Namespace, samples: Path, tmp: Path) -> dict[str, Any]:
    spec, out = tmp / "spec.json", tmp / "out.json"
    spec.write_text(json.dumps({
        "model": str(model), "prompts": prompts, "held_out": held_out, "tokens": args.tokens,
        "codecs": codecs, "sample_bytes": int(args.sample_mib * 2**20), "samples": str(samples),
    }))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCORE_")}
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_NUM_OF_RESERVED_CPU="1",
               TOKENIZERS_PARALLELISM="false", KVCORE_TIERS="cpu", KVCORE_CPU_SIZE="6GiB",
               KVCORE_CHUNK_SIZE=os.environ.get("KVCORE_CHUNK_SIZE", "256"),
               KVCORE_VERIFY_SAMPLE="0",
               KVCORE_PLUGINS="vllm")
    proc = subprocess.run([sys.executable, "-m", "kvcore_vllm.bench_codec", str(spec), str(out)],
                          env=env, capture_output=True, text=True, timeout=args.timeout_s)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"codec bench engine failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def _read_samples(path: Path, chunk_bytes: int) -> list[np.ndarray]:
    if chunk_bytes <= 0:
        raise RuntimeError("the engine stored no chunk to measure the codecs on")
    data = np.fromfile(path, dtype=np.uint8)
    return [data[i:i + chunk_bytes] for i in range(0, data.size - chunk_bytes + 1, chunk_bytes)]


# -- throughput ------------------------------------------------------------------------------------

def _best(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def throughput(chunks: list[np.ndarray], codecs: list[str], dtype: str,
               repeat: int) -> dict[str, Any]:
    """Ratio and one-core encode/decode GB/s of each codec over ``chunks``, memcpy beside."""
    from kvcore.codecs.context import CodecContext
    from kvcore.plugins import get_registry

    context = CodecContext(get_registry())
    raw_total = sum(c.nbytes for c in chunks)
    dests = [np.empty_like(c) for c in chunks]

    def memcpy() -> None:
        for src, dst in zip(chunks, dests):
            np.copyto(dst, src)

    report: dict[str, Any] = {"memcpy_gbps": raw_total / _best(memcpy, repeat) / 1e9,
                              "dtype": dtype, "codecs": {}}
    for name in codecs:
        codec = codec_named(context, name)
        assert codec is not None, "none is not a codec to measure"
        report["codecs"][name] = measure(codec, chunks, dtype, repeat)
    return report


def measure(codec: Any, chunks: list[np.ndarray], dtype: str, repeat: int) -> dict[str, Any]:
    """One codec's figures over ``chunks``; its decoded bytes are checked (lossless: equal)."""
    raw_total = sum(c.nbytes for c in chunks)
    encoded: list[Any] = []
    decoded: list[Any] = []

    def encode() -> None:
        encoded[:] = [codec.encode(c.data, dtype) for c in chunks]

    def decode() -> None:
        decoded[:] = [codec.decode(memoryview(e).cast("B"), c.nbytes)
                      for e, c in zip(encoded, chunks) if e is not None]

    encode_s = _best(encode, repeat)
    decode_s = _best(decode, repeat)
    sizes = [memoryview(e).nbytes if e is not None else c.nbytes for e, c in zip(encoded, chunks)]
    decoded_raw = sum(c.nbytes for e, c in zip(encoded, chunks) if e is not None)
    figures: dict[str, Any] = {
        "lossy": codec.lossy,
        "ratio": raw_total / sum(sizes),
        "encode_gbps": raw_total / encode_s / 1e9,
        "decode_gbps": decoded_raw / decode_s / 1e9 if decoded_raw else 0.0,
        "encoded_chunks": sum(e is not None for e in encoded),
    }
    kept = [c for e, c in zip(encoded, chunks) if e is not None]
    if not codec.lossy:
        figures["lossless_verified"] = all(bytes(d) == c.tobytes() for d, c in zip(decoded, kept))
    else:
        figures["relative_rms_error"] = _relative_rms(kept, decoded, dtype)
    return figures


def _relative_rms(chunks: list[np.ndarray], decoded: list[Any], dtype: str) -> float:
    from kvcore.codecs.dtypes import to_float32

    err = norm = 0.0
    for c, d in zip(chunks, decoded):
        a = to_float32(c, dtype).astype(np.float64)
        b = to_float32(np.frombuffer(d, np.uint8), dtype).astype(np.float64)
        err += float(((a - b) ** 2).sum())
        norm += float((a ** 2).sum())
    return math.sqrt(err / norm) if norm else 0.0


# -- the engine process -----------------------------------------------------------------------

def _child(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    from kvcore_vllm import runtime
    from kvcore_vllm.testing import drain, reset_prefix_cache

    spec = json.loads(Path(spec_path).read_text())
    prompts: list[list[int]] = spec["prompts"]
    held_out: list[int] = spec["held_out"]
    longest = max(len(p) for p in [*prompts, held_out])
    llm = LLM(model=spec["model"], skip_tokenizer_init=True, enforce_eager=True,
              max_model_len=longest + spec["tokens"] + 8, max_num_batched_tokens=8192, seed=0,
              kv_cache_memory_bytes=2 << 30,
              kv_transfer_config=KVTransferConfig(kv_connector="KVCoreConnector",
                                                  kv_role="kv_both"))

    def generate(batch: list[list[int]], params: Any) -> list[Any]:
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params,
                               use_tqdm=False)
        runtime.flush_all(120)
        drain(llm)
        runtime.flush_all(120)
        return list(outputs)

    with runtime._lock:
        engine = next(e for e, _ in runtime._engines.values())
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False)
    fresh = generate(prompts, one)  # computed without a hit, and stored
    if spec["codecs"]:
        generate([held_out[:HELD_OUT_PREFIX]], one)
    engine.flush(300)
    seconds["store_pass"] = time.perf_counter() - started
    result: dict[str, Any] = {"fresh_first": [o.outputs[0].token_ids[0] for o in fresh],
                              "dtype": _dtype(engine), "seconds": seconds, "runs": {}}
    result["sample_chunk_bytes"] = _write_samples(engine, Path(spec["samples"]),
                                                  spec["sample_bytes"])
    if spec["codecs"]:
        stored = _snapshot(engine)
        greedy = SamplingParams(max_tokens=spec["tokens"], temperature=0.0, ignore_eos=True,
                                detokenize=False)
        reference: list[list[int]] = []
        for name in ["none", *spec["codecs"]]:
            codec = codec_named(engine.codecs, name)
            if codec is not None and not codec.lossy:
                continue  # lossless: loads are byte-identical (the throughput check)
            started = time.perf_counter()
            _load_as_through(engine, stored, codec, result["dtype"])
            reset_prefix_cache(llm)
            outputs = generate(prompts, greedy)
            run: dict[str, Any] = {
                "outputs": [list(o.outputs[0].token_ids) for o in outputs],
                "loaded_tokens": sum(int(o.num_cached_tokens or 0) for o in outputs)}
            reference = reference or run["outputs"]
            _load_as_through(engine, stored, codec, result["dtype"])
            reset_prefix_cache(llm)
            run["forced_top1"] = _forced_top1(generate, prompts, reference, SamplingParams)
            reset_prefix_cache(llm)
            run["held_out"] = _held_out_perplexity(llm, held_out, TokensPrompt, SamplingParams)
            seconds[name] = time.perf_counter() - started
            result["runs"][name] = run
        started = time.perf_counter()
        result["recompute"] = _recomputed(engine, llm, generate, prompts, reference, held_out,
                                          greedy, result["runs"]["none"]["held_out"])
        seconds["recompute"] = time.perf_counter() - started
    Path(out_path).write_text(json.dumps(result))


def _recomputed(engine: Any, llm: Any, generate: Any, prompts: list[list[int]],
                reference: list[list[int]], held_out: list[int], greedy: Any,
                exact_held_out: dict[str, Any]) -> dict[str, Any]:
    """The same three measurements with nothing loaded (kvcore's memory and vLLM's prefix
    cache emptied before each): the engine's own numerical noise, against which a codec's
    agreement with exact loads reads (the prefix computed in another batch shape, the suffix's
    attention over a cache it wrote itself)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from kvcore_vllm.testing import reset_prefix_cache

    def fresh() -> None:
        engine.clear(tier="cpu")
        reset_prefix_cache(llm)

    fresh()
    outputs = generate(prompts, greedy)
    run: dict[str, Any] = {"outputs": [list(o.outputs[0].token_ids) for o in outputs],
                           "loaded_tokens": sum(int(o.num_cached_tokens or 0) for o in outputs)}
    fresh()
    run["forced_top1"] = _forced_top1(generate, prompts, reference, SamplingParams, loaded=False)
    fresh()
    run["held_out"] = _held_out_perplexity(llm, held_out, TokensPrompt, SamplingParams,
                                           first=exact_held_out["cached_tokens"] + 1)
    fresh()
    return run


def _snapshot(engine: Any) -> dict[bytes, bytes]:
    """Every chunk in the memory tier, raw (what pass 1 computed and stored)."""
    keys = list(engine.memory.iter_keys())
    return {k: bytes(v) for k, v in zip(keys, engine.memory.get(keys)) if v is not None}


def _load_as_through(engine: Any, stored: dict[bytes, bytes], codec: Any, dtype: str) -> None:
    """Put the stored chunks back into memory as a load through ``codec`` gives them (its
    deterministic round trip, byte-identical to a read from a tier with that codec, which the
    LMDB and Redis codec tests check); ``None``: exactly as stored."""
    engine.clear(tier="cpu")
    keys, values = [], []
    for key, raw in stored.items():
        value = raw
        if codec is not None:
            encoded = codec.encode(memoryview(raw), dtype)
            if encoded is not None:
                value = bytes(codec.decode(memoryview(encoded).cast("B"), len(raw)))
        keys.append(key)
        values.append(value)
    for key, value in zip(keys, values):
        if engine.store_buffers([key], [value]).wait(60) != 1:
            raise RuntimeError("the memory tier refused a chunk: raise KVCORE_CPU_SIZE")


def _forced_top1(generate: Any, prompts: list[list[int]], forced: list[list[int]],
                 sampling_params: Any, loaded: bool = True) -> list[list[int]]:
    """For each prompt followed by its reference output, the model's top token at each output
    position (teacher forcing: every position sees the same history, so one flipped token does
    not shift the rest), the prompt's chunks loaded by kvcore (``loaded``) or recomputed."""
    params = sampling_params(max_tokens=1, temperature=0.0, detokenize=False, prompt_logprobs=1,
                             skip_reading_prefix_cache=False)
    outputs = generate([p + f for p, f in zip(prompts, forced)], params)
    tops = []
    for prompt, out in zip(prompts, outputs):
        expected = len(prompt) - 1 if loaded else 0
        if int(out.num_cached_tokens or 0) != expected:
            raise RuntimeError(f"{out.num_cached_tokens} tokens loaded, not {expected}")
        entries = list(out.prompt_logprobs or [])[len(prompt):]
        tops.append([next(t for t, lp in e.items() if lp.rank == 1) for e in entries])
    return tops


def _dtype(engine: Any) -> str:
    """The element type of the engine's namespace (every key stored here shares it)."""
    key = next(iter(engine.memory.iter_keys()))
    dtype = engine.codecs.dtype_of(key)
    if dtype is None:
        raise RuntimeError("the connector did not note its namespace's dtype")
    return str(dtype)


def _write_samples(engine: Any, path: Path, limit: int) -> int:
    """Write stored chunks (raw, as the lower tiers get them) until ``limit`` bytes."""
    keys = list(engine.memory.iter_keys())
    written = size = 0
    with path.open("wb") as f:
        for value in engine.memory.get(keys):
            if value is None:
                continue
            size = size or memoryview(value).nbytes
            f.write(value)
            written += size
            if written >= limit:
                break
    return size


def _held_out_perplexity(llm: Any, held_out: list[int], tokens_prompt: Any,
                         sampling_params: Any, first: int = 0) -> dict[str, Any]:
    """Perplexity of the held-out text after its first ``HELD_OUT_PREFIX`` tokens (stored in
    pass 1), loaded by kvcore (``skip_reading_prefix_cache=False``: vLLM would otherwise
    recompute them); every token after the loaded chunks is scored. ``first`` > 0: nothing is
    loaded, and the tokens from ``first`` on are scored (those an exact load scored)."""
    params = sampling_params(max_tokens=1, temperature=0.0, detokenize=False, prompt_logprobs=0,
                             skip_reading_prefix_cache=False)
    (out,) = llm.generate([tokens_prompt(prompt_token_ids=held_out)], params, use_tqdm=False)
    cached = int(out.num_cached_tokens or 0)
    if first and cached:
        raise RuntimeError(f"{cached} held-out tokens loaded where none should be")
    if not first and cached < HELD_OUT_PREFIX // 2:
        raise RuntimeError(f"the held-out prefix was not loaded ({cached} tokens cached)")
    # token i's logprob comes from position i - 1: vLLM leaves garbage where that position
    # was loaded, not computed, so the first scored token is the one after the first computed
    first = first or cached + 1
    entries = list(out.prompt_logprobs or [])[first:]
    if len(entries) < HELD_OUT_EVAL // 2 or len(entries) != len(held_out) - first:
        raise RuntimeError(f"{len(entries)} prompt logprobs after {cached} cached tokens")
    nll = -sum(entry[token].logprob for entry, token in zip(entries, held_out[first:]))
    return {"perplexity": math.exp(nll / len(entries)), "cached_tokens": cached,
            "first_scored": first,
            "scored_tokens": len(entries)}


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
