"""``python -m demo``: vLLM with kvcore against vLLM alone, on one workload, with a table and a plot.

Both runs use the same model, the same engine KV pool (small on purpose: a serving engine's pool
is always smaller than the set of live conversations) and the same requests. kvcore runs on its
built-in defaults; the only difference is ``--kv-transfer-config`` naming ``KVCoreConnector``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import httpx

from demo.client import Result, complete
from demo.report import RunSummary, plot, table
from demo.server import VLLMServer
from demo.workloads import ChatWorkload, Request, mooncake_requests

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT.parent / "shared" / "data" / "traces" / "mooncake_synthetic_trace.jsonl"


def kv_bytes_per_token(model: Path) -> int:
    """Layers x (K, V) x KV heads x head size x 2 bytes (bf16), from the model's config."""
    config = json.loads((model / "config.json").read_text())
    head_size = config["hidden_size"] // config["num_attention_heads"]
    return config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * head_size * 2


def log(message: str) -> None:
    print(message, flush=True)


def hit_ratio(before: dict[str, float], after: dict[str, float]) -> float:
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    queries = delta("vllm:prefix_cache_queries_total") or delta("vllm:prefix_cache_queries")
    hits = (delta("vllm:prefix_cache_hits_total") or delta("vllm:prefix_cache_hits")) + (
        delta("vllm:external_prefix_cache_hits_total") or delta("vllm:external_prefix_cache_hits"))
    return hits / queries if queries else 0.0


def run_requests(server: VLLMServer, name: str, workload: str, args: argparse.Namespace) -> RunSummary:
    results: list[Result] = []
    before = server.metrics()
    started = time.perf_counter()
    with httpx.Client() as client:

        def send(request: Request) -> Result:
            result = complete(client, server.url, request)
            results.append(result)
            tag = "repeat" if request.repeated_prefix else "new   "
            log(f"  [{name}] {len(results):>3} {request.user:<8} round {request.round} {tag} "
                f"{request.tokens:>6} tokens  TTFT {result.ttft_s:7.3f}s")
            return result

        if workload == "chat":
            chat = ChatWorkload(users=args.users, rounds=args.rounds)
            answers = {r.user: send(r).text for r in chat.first_round()}
            for round_ in range(1, args.rounds):
                answers = {r.user: send(r).text for r in chat.next_round(round_, answers)}
        else:
            # vLLM refuses prompts over 6 characters a token before tokenizing; the demo's
            # words ("w12345 ") take about 7, so stay at 80% of the context.
            budget = int(args.max_model_len * 0.8)
            for request in mooncake_requests(TRACE, args.requests, args.block_tokens, budget):
                send(request)
    wall = time.perf_counter() - started
    return RunSummary(name, results, wall, hit_ratio(before, server.metrics()))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    parser.add_argument("--workload", choices=["chat", "mooncake"], default="chat")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=40, help="mooncake: requests replayed")
    parser.add_argument("--block-tokens", type=int, default=128,
                        help="mooncake: tokens per 512-token trace block (scaled down)")
    parser.add_argument("--max-model-len", type=int, default=12288)
    parser.add_argument("--kv-pool-tokens", type=int, default=13312,
                        help="engine KV pool, in tokens (small on purpose)")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "demo")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from kvcore_vllm.testing import build_tiny_llama

    log("== building a small random-weight Llama (4 layers, hidden 1024) and its tokenizer")
    model = build_tiny_llama(args.out / "model")
    pool = args.kv_pool_tokens * kv_bytes_per_token(model)
    runs: list[RunSummary] = []
    for name, with_kvcore in (("vLLM + kvcore", True), ("vLLM alone", False)):
        server_log = args.out / f"server-{'kvcore' if with_kvcore else 'alone'}.log"
        log(f"== starting vLLM OpenAI server ({name}); log in {server_log}")
        with VLLMServer(model, server_log, with_kvcore, pool, args.max_model_len) as server:
            server.wait_ready()
            log(f"== {name}: {args.workload} workload")
            runs.append(run_requests(server, name, args.workload, args))
    log("")
    log(table(runs))
    kv, alone = (r.row() for r in runs)
    speedup = alone["repeated_ttft_mean_s"] / kv["repeated_ttft_mean_s"]
    if speedup == speedup:  # not NaN: some requests repeated a prefix
        log(f"\nrepeated-prefix TTFT: {speedup:.1f}x lower with kvcore "
            f"({kv['repeated_ttft_mean_s']:.3f}s vs {alone['repeated_ttft_mean_s']:.3f}s)")
    else:
        log("\nno request repeated an earlier prefix: nothing for a cache to reuse")
    png = args.out / f"demo-{args.workload}.png"
    plot(runs, png, f"TTFT per request, {args.workload} workload")
    log(f"plot: {png}")
    if args.json:
        print(json.dumps({r.name: r.row() for r in runs} | {"repeated_ttft_speedup": speedup},
                         indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
