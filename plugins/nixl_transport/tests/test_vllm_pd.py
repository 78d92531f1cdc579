"""Prefill/decode disaggregation with two real vLLM OpenAI servers, kvcore and the proxy.

The prefill server runs KVCORE_TIERS=cpu,nixl_peer with KVCORE_NIXL_SERVE=1; the decode server
reads from it (KVCORE_NIXL_PEERS). Outputs are compared with a single-engine reference that
recomputes the same number of tokens (run with kvcore_vllm.testing.run_engine).
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import HERE

from kvcore.testing.ports import free_port

pytestmark = pytest.mark.vllm
testing = pytest.importorskip("kvcore_vllm.testing")

CHUNK = 256
PROMPT = testing.random_prompt(4 * CHUNK + 1, seed=11)
PROMPT2 = testing.random_prompt(4 * CHUNK + 1, seed=12)
MAX_TOKENS = 8
SERVER_FLAGS = ["--enforce-eager", "--max-model-len", "16384", "--max-num-batched-tokens",
                "16384", "--seed", "0", "--kv-cache-memory-bytes", str(1 << 30),
                "--enable-prompt-tokens-details", "--kv-transfer-config",
                json.dumps({"kv_connector": "KVCoreConnector", "kv_role": "kv_both"})]


def cores_for(role: str) -> str:
    """One core per server (``VLLM_CPU_OMP_THREADS_BIND``): vLLM pins a CPU worker's threads to
    its OpenMP cores, and two workers on the same core starve each other (their busy-polling
    loops leave the prefill's side channel seconds without CPU, so the decode side's reads time
    out). Separate resources are what a P/D deployment has anyway."""
    cores = sorted(os.sched_getaffinity(0))
    return str(cores[0] if role == "prefill" else cores[-1])


class Server:
    """``python -m vllm.entrypoints.openai.api_server`` on loopback; killed by :meth:`stop`."""

    def __init__(self, model: Path, log: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.log = log
        child_env = {**os.environ, "VLLM_CPU_NUM_OF_RESERVED_CPU": "1",
                     "TOKENIZERS_PARALLELISM": "false", "KVCORE_CHUNK_SIZE": str(CHUNK),
                     "KVCORE_VERIFY_SAMPLE": "0", **env}  # every hit is asserted
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
             "--host", "127.0.0.1", "--port", str(self.port), *SERVER_FLAGS],
            env=child_env, stdout=log.open("w"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, limit_s: float = 400.0) -> None:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"vLLM server exited:\n{self.log.read_text()[-4000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(1)
        pytest.fail(f"vLLM server not ready:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)  # the server and the engine-core process it started
        self.proc.wait()


def complete(base_port: int, prompt: list[int], model: Path) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", base_port, timeout=300)
    body = {"model": str(model), "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    assert resp.status == 200, data
    return data


def metric(port: int, name: str) -> float:
    """Sum of a Prometheus counter over its labels on a vLLM server's /metrics."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


@functools.cache
def _agent() -> Any:
    from kvcore_nixl.agent import Agent

    return Agent()


def chunks_at(address: str) -> int:
    from kvcore_nixl.client import PeerClient

    client = PeerClient(address, _agent(), timeout_s=5.0)
    try:
        return int(client.stats()["chunks"])
    finally:
        client.close()


@pytest.fixture(scope="module")
def model(tmp_path_factory: Any) -> Path:
    return testing.build_tiny_llama(tmp_path_factory.mktemp("llama"), layers=2, hidden=512,
                                    heads=8, kv_heads=4)


@pytest.fixture(scope="module")
def reference(model: Path) -> dict[str, list[int]]:
    """Full compute (step 1) and compute of the last token after a kvcore load (step 2)."""
    result = testing.run_engine(model, [
        testing.Step([PROMPT, PROMPT2], max_tokens=MAX_TOKENS),
        testing.Step([PROMPT], max_tokens=MAX_TOKENS, reset_prefix_cache=True),
    ], env={"KVCORE_CHUNK_SIZE": str(CHUNK)})
    assert result.steps[1].num_cached_tokens[0] == 4 * CHUNK
    return {"full": result.steps[0].outputs[0], "full2": result.steps[0].outputs[1],
            "loaded": result.steps[1].outputs[0]}


@pytest.fixture
def servers(model: Path, tmp_path: Path) -> Iterator:
    started: list[Server] = []

    def start(role: str, env: dict[str, str]) -> Server:
        server = Server(model, tmp_path / f"{role}.log",
                        {"UCX_TLS": "tcp", "VLLM_CPU_OMP_THREADS_BIND": cores_for(role), **env})
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def proxy_for(prefill: Server, decode: Server) -> Any:
    from kvcore_nixl.proxy import make_server

    proxy = make_server("127.0.0.1", 0, [prefill.url], [decode.url], timeout_s=300)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    return proxy


def test_decode_loads_prefill_kv(servers: Any, model: Path, reference: Any) -> None:
    nixl = f"127.0.0.1:{free_port()}"
    prefill = servers("prefill", {"KVCORE_TIERS": "cpu,nixl_peer", "KVCORE_NIXL_SERVE": "1",
                                  "KVCORE_NIXL_LISTEN": nixl})
    decode = servers("decode", {"KVCORE_TIERS": "cpu,nixl_peer", "KVCORE_NIXL_PEERS": nixl})
    prefill.wait_ready()
    decode.wait_ready()
    proxy = proxy_for(prefill, decode)
    try:
        port = proxy.server_address[1]
        assert metric(decode.port, "vllm:external_prefix_cache_hits_total") == 0
        # Straight through the proxy: the decode side asks while the prefill's store may still
        # run; the prefill's server counts those chunks and its lease waits for them.
        answer = complete(port, PROMPT, model)
        assert chunks_at(nixl) == 4
        assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 4 * CHUNK
        # The decode engine's own metrics: the prompt's chunks came from kvcore (over NIXL).
        # The load is asynchronous; vLLM counts each attempt's hit, and a loaded machine can
        # need a retry (at most kvcore_vllm.scheduler.LOAD_RETRIES attempts) while the
        # prefill's store is still running.
        hits = metric(decode.port, "vllm:external_prefix_cache_hits_total")
        assert hits % (4 * CHUNK) == 0 and 4 * CHUNK <= hits <= 3 * 4 * CHUNK
        assert answer["choices"][0]["token_ids"] == reference["loaded"]
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_prefill_killed_mid_transfer_request_completes(
    servers: Any, model: Path, reference: Any
) -> None:
    nixl = f"127.0.0.1:{free_port()}"
    prefill = servers("prefill", {
        "KVCORE_TIERS": "cpu,nixl_peer", "KVCORE_NIXL_SERVE": "1", "KVCORE_NIXL_LISTEN": nixl,
        "PYTHONPATH": os.pathsep.join([str(HERE / "die_after_lease"),
                                       os.environ.get("PYTHONPATH", "")]),
    })
    decode = servers("decode", {"KVCORE_TIERS": "cpu,nixl_peer", "KVCORE_NIXL_PEERS": nixl,
                                "KVCORE_NIXL_TIMEOUT_S": "3"})
    prefill.wait_ready()
    decode.wait_ready()
    proxy = proxy_for(prefill, decode)
    try:
        answer = complete(proxy.server_address[1], PROMPT2, model)
        # Its engine died answering the decode side's lease, which takes the server down.
        prefill.proc.wait(60)
        assert "KV load failure" in decode.log.read_text()
        assert answer["choices"][0]["token_ids"] == reference["full2"]
    finally:
        proxy.shutdown()
        proxy.server_close()
