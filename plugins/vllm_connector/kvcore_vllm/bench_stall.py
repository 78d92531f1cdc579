"""``kvcore bench stall``: does a load from a slow tier stall the requests that are decoding?

On a real vLLM engine (a random-weight Llama built here), 4 requests decode while a fifth
arrives whose 8K-token prefix kvcore holds only in a lower tier (LMDB, or Redis started by the
bench). Each engine run measures, in the same process:

- the decode step time of the 4 requests alone (``baseline_step_s``);
- the step in which a request with the same prefix joins them with no load at all, its prefix
  in vLLM's own cache (``noload_join_step_s``: it computes one token over 8K cached tokens);
- with the prefix only in the lower tier: every step from that request's arrival to its first
  token, and its TTFT.

``decode_slowdown`` is how much longer the 4 decoding requests waited per step while the prefix
loaded: with synchronous loads (``KVCORE_VLLM_ASYNC_LOADS=false``) the load sits inside the join
step (join step / no-load join step); with asynchronous ones the batch keeps stepping while the
prefix arrives (mean of those steps / baseline step). Goal: at most 1.10 asynchronously.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DECODERS = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=8192, help="prefix length to load")
    parser.add_argument("--tiers", default="lmdb,redis",
                        help="lower tiers to load from, comma-separated (lmdb, redis)")
    parser.add_argument("--steps", type=int, default=20, help="baseline decode steps")
    parser.add_argument("--model-dir", default=None, help="where to build the model (cached)")
    parser.add_argument("--redis-nice", type=int, default=0,
                        help="nice value of the redis-server the bench starts: it shares this "
                             "machine's cores with the engine, where a deployment's Redis "
                             "runs on another host (10 models that; 0 measures it co-located)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kvcore_vllm.testing import build_tiny_llama

    model_dir = Path(args.model_dir or Path(tempfile.gettempdir()) / "kvcore-bench-llama")
    model = build_tiny_llama(model_dir, layers=4, hidden=1024)
    results: dict[str, Any] = {"prefix_tokens": args.tokens, "decoders": DECODERS,
                               "redis_nice": args.redis_nice, "tiers": {}}
    for tier in [t.strip() for t in args.tiers.split(",") if t.strip()]:
        by_mode = {}
        for mode in ("sync", "async"):
            print(f"== {tier}: {mode} loads", file=sys.stderr, flush=True)
            with TierEnv(tier, args.redis_nice) as env:  # a fresh store for each run
                by_mode[mode] = _run_child(model, tier, mode, args, env)
        sync, asyn = by_mode["sync"], by_mode["async"]
        while_loading = asyn["window_s"][:-1] or asyn["window_s"]
        results["tiers"][tier] = {
            **{f"{m}_{k}": v for m, r in by_mode.items() for k, v in r.items() if k != "window_s"},
            "sync_decode_slowdown": sync["window_s"][0] / sync["noload_join_step_s"],
            "async_decode_slowdown": statistics.mean(while_loading) / asyn["baseline_step_s"],
            "async_join_step_ratio": asyn["window_s"][-1] / asyn["noload_join_step_s"],
            "sync_window_steps": len(sync["window_s"]),
            "async_window_steps": len(asyn["window_s"]),
            "goal_async_slowdown_at_most": 1.10,
        }
    return results


class TierEnv:
    """Environment of a child run for one lower tier, in a fresh store (starts redis-server
    for ``redis``; ``extra`` adds variables, for example the tier's codec)."""

    def __init__(self, tier: str, redis_nice: int = 0,
                 extra: dict[str, str] | None = None) -> None:
        self.tier = tier
        self.redis_nice = redis_nice
        self.extra = extra or {}
        self.server: Any = None
        self.tmp = tempfile.TemporaryDirectory(prefix="kvcore-stall-")

    def __enter__(self) -> dict[str, str]:
        env = {"KVCORE_TIERS": f"cpu,{self.tier}", "KVCORE_CPU_SIZE": "2GiB",
               "KVCORE_VERIFY_SAMPLE": "0"}
        if self.tier == "lmdb":
            env["KVCORE_LMDB_PATH"] = str(Path(self.tmp.name) / "lmdb")
            env["KVCORE_LMDB_SIZE"] = "4GiB"
        elif self.tier == "redis":
            from kvcore_redis.server import RedisServer

            self.server = RedisServer(maxmemory="2gb")
            if self.redis_nice and self.server.proc is not None:
                os.setpriority(os.PRIO_PROCESS, self.server.proc.pid, self.redis_nice)
            env["KVCORE_REDIS_URL"] = self.server.url
            env["KVCORE_REDIS_SIZE"] = "1GiB"
        else:
            raise ValueError(f"--tiers: unknown tier {self.tier!r} (lmdb or redis)")
        return {**env, **self.extra}

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self.server.stop()
        self.tmp.cleanup()


def _run_child(model: Path, tier: str, mode: str, args: argparse.Namespace,
               env: dict[str, str]) -> dict[str, Any]:
    child_env = {**os.environ, **env, "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                 "VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "TOKENIZERS_PARALLELISM": "false",
                 "KVCORE_VLLM_ASYNC_LOADS": "true" if mode == "async" else "false"}
    with tempfile.TemporaryDirectory(prefix="kvcore-stall-run-") as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec.write_text(json.dumps({"model": str(model), "tokens": args.tokens,
                                    "steps": args.steps}))
        proc = subprocess.run([sys.executable, "-m", "kvcore_vllm.bench_stall", str(spec),
                               str(out)], env=child_env, capture_output=True, text=True,
                              timeout=900)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"stall run ({tier}, {mode}) failed:\n"
                               f"{(proc.stdout + proc.stderr)[-4000:]}")
        return json.loads(out.read_text())


def _child(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    from kvcore_vllm import runtime
    from kvcore_vllm.testing import drain, random_prompt

    spec = json.loads(Path(spec_path).read_text())
    n = spec["tokens"]
    llm = LLM(model=spec["model"], skip_tokenizer_init=True, enforce_eager=True,
              max_model_len=n + 1024, max_num_batched_tokens=n + 1024, seed=0,
              kv_cache_memory_bytes=1 << 30,
              kv_transfer_config=KVTransferConfig(kv_connector="KVCoreConnector",
                                                  kv_role="kv_both"))
    prefix = random_prompt(n + 1, seed=7)  # loaded from the lower tier
    local = random_prompt(n + 1, seed=8)  # the no-load case: in vLLM's own prefix cache
    once = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False)

    def generate(prompt: list[int]) -> None:
        llm.generate([TokensPrompt(prompt_token_ids=prompt)], once, use_tqdm=False)
        runtime.flush_all()
        drain(llm)  # vLLM frees the blocks kvcore's stores held

    generate(prefix)
    with runtime._lock:
        engines = [e for e, _ in runtime._engines.values()]
    for engine in engines:  # write-behind done: the prefix is in the lower tier only
        engine.flush(60.0)
        engine.clear(tier="cpu")
    if not llm.reset_prefix_cache():
        raise RuntimeError("vLLM kept its prefix cache: the load would not come from kvcore")
    generate(local)

    core = llm.llm_engine
    decode = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True,
                            detokenize=False)
    for i in range(DECODERS):
        core.add_request(f"decode-{i}", TokensPrompt(prompt_token_ids=random_prompt(64, 100 + i)),
                         decode)
    for _ in range(3):  # their prefills
        core.step()
    baseline = []
    for _ in range(spec["steps"]):
        started = time.perf_counter()
        core.step()
        baseline.append(time.perf_counter() - started)

    def join(request_id: str, prompt: list[int]) -> tuple[list[float], float, int]:
        """Steps from the arrival of a request to its first token."""
        arrived = time.perf_counter()
        core.add_request(request_id, TokensPrompt(prompt_token_ids=prompt), once)
        window: list[float] = []
        for _ in range(10_000):
            started = time.perf_counter()
            outputs = core.step()
            window.append(time.perf_counter() - started)
            done = [o for o in outputs if o.request_id == request_id and _has_token(o)]
            if done:
                return window, time.perf_counter() - arrived, int(done[0].num_cached_tokens or 0)
        raise RuntimeError(f"{request_id} produced no token")

    before = runtime.counters(engines[0]).get("vllm_loaded_tokens_total", 0)
    noload, _, local_hit = join("noload", local)
    for _ in range(3):
        core.step()
    window, ttft, cached = join("load", prefix)
    counters = runtime.counters(engines[0]) if engines else {}
    Path(out_path).write_text(json.dumps({
        "baseline_step_s": statistics.mean(baseline),
        "noload_join_step_s": max(noload),
        "noload_cached_tokens": local_hit,
        "window_s": window,
        "ttft_s": ttft,
        "cached_tokens": cached,
        "kvcore_loaded_tokens": counters.get("vllm_loaded_tokens_total", 0) - before,
        "async_loads": counters.get("vllm_async_loads_total", 0),
    }))


def _has_token(output: Any) -> bool:
    """Whether a RequestOutput carries a generated token."""
    return bool(output.outputs and output.outputs[0].token_ids)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
