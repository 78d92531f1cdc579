"""With real vLLM engines (kvcore-vllm connector) reporting to a real controller: kvcore hits
show in the controller's metrics, a prefix pinned through the control API survives pressure
that evicts everything else, and a gateway that knows only the served model name and the token
ids routes a prompt to the engine holding its prefix."""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.vllm

if importlib.util.find_spec("vllm") is None:  # not imported here: it is slow to import
    pytest.skip("vLLM is not installed", allow_module_level=True)
pytest.importorskip("fastapi")
testing = pytest.importorskip("kvcore_vllm.testing")

from kvcore.testing.controller import start_controller as controller_process  # noqa: E402

TOKEN = "vllm-test-token"


def start_controller() -> tuple[subprocess.Popen, str]:
    return controller_process(TOKEN)


CHILD = textwrap.dedent('''
    """One vLLM engine with kvcore reporting to the controller; writes what it saw as JSON."""
    import json, sys, time
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt
    import kvcore_vllm.connector as connector
    from kvcore_vllm.runtime import flush_all
    from kvcore_vllm.testing import drain as _drain
    from kvcore.control.client import ControllerClient

    spec = json.loads(open(sys.argv[1]).read())
    engines = []
    acquire = connector.acquire_engine

    def acquire_and_record(settings, **kwargs):
        engine = acquire(settings, **kwargs)
        engines.append(engine)
        return engine

    connector.acquire_engine = acquire_and_record

    if __name__ == "__main__":
        llm = LLM(model=spec["model"], skip_tokenizer_init=True, enforce_eager=True,
                  max_model_len=4096, max_num_batched_tokens=4096, seed=0,
                  kv_cache_memory_bytes=256 << 20,
                  kv_transfer_config=KVTransferConfig(kv_connector="KVCoreConnector",
                                                      kv_role="kv_both"))
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True,
                                detokenize=False)
        client = ControllerClient(spec["url"], spec["token"])
        out = {}

        def generate(prompt):
            llm.reset_prefix_cache()  # vLLM's own cache off: hits can only come from kvcore
            result = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params,
                                  use_tqdm=False)
            flush_all()
            _drain(llm)
            return int(result[0].num_cached_tokens or 0)

        def wait_for(check, timeout=30.0):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                value = check()
                if value:
                    return value
                time.sleep(0.1)
            return check()

        engine = engines[0]
        reporter = engine.attachments["controller"]  # the engine reports by itself
        pinned, pressure = spec["pinned"], spec["pressure"]
        out["first"] = generate(pinned)
        namespace = next(engine.memory.iter_keys())[:8].hex()
        instance = reporter.instance_id
        out["indexed"] = wait_for(lambda: client.lookup(namespace, pinned).get(instance))
        out["hit"] = generate(pinned)

        def hit_tokens():
            text = client.metrics_text()
            for line in text.splitlines():
                if line.startswith("kvcore_hit_tokens_total{") and instance in line:
                    return float(line.split()[-1])
            return 0.0

        out["metrics_hit_tokens"] = wait_for(lambda: hit_tokens() >= out["hit"] > 0 and
                                             hit_tokens())
        out["pin"] = client.pin(namespace, pinned, instance=instance)
        out["pressure_first"] = [generate(p) for p in pressure]
        out["evictions"] = engine.metrics.get("evictions_total", "cpu")
        out["pressure_again"] = generate(pressure[0])
        out["pinned_again"] = generate(pinned)
        out["index_pinned"] = wait_for(lambda: client.lookup(namespace, pinned).get(instance))
        with open(sys.argv[2], "w") as f:
            json.dump(out, f)
''')


def test_vllm_hits_in_metrics_and_pinned_prefix_survives(tmp_path: Path) -> None:
    model = testing.build_tiny_llama(tmp_path / "llama", layers=2, hidden=256, heads=4,
                                     kv_heads=2, max_positions=4096)
    chunk = 256
    pinned = testing.random_prompt(2 * chunk + 1, seed=1)
    pressure = [testing.random_prompt(2 * chunk + 1, seed=10 + i) for i in range(8)]
    chunk_bytes = 2 * 2 * 2 * 64 * 2 * chunk  # layers * (K,V) * kv heads * head size * bf16
    proc, url = start_controller()
    try:
        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps({"model": str(model), "url": url, "token": TOKEN,
                                    "pinned": pinned, "pressure": pressure}))
        script, result = tmp_path / "child.py", tmp_path / "out.json"
        script.write_text(CHILD)
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "TOKENIZERS_PARALLELISM": "false",
               "KVCORE_CHUNK_SIZE": str(chunk), "KVCORE_CPU_SIZE": str(8 * chunk_bytes),
               "KVCORE_EVICTION": "lru", "KVCORE_CONTROLLER_URL": url,
               "KVCORE_CONTROLLER_TOKEN": TOKEN, "KVCORE_CONTROLLER_HEARTBEAT_S": "0.2",
               "KVCORE_CONTROLLER_FLUSH_S": "0.05",
               "KVCORE_VERIFY_SAMPLE": "0"}  # every hit is asserted: none sampled to recompute
        run = subprocess.run([sys.executable, str(script), str(spec), str(result)], env=env,
                             capture_output=True, text=True, timeout=540)
        assert run.returncode == 0 and result.exists(), (run.stdout + run.stderr)[-6000:]
        out = json.loads(result.read_text())
    finally:
        proc.kill()
        proc.wait(10)
    assert out["first"] == 0
    assert out["indexed"] == 2 * chunk
    assert out["hit"] == 2 * chunk
    assert out["metrics_hit_tokens"] >= 2 * chunk
    (pin,) = out["pin"]
    assert pin["ok"] and pin["result"]["chunks"] == 2
    assert out["pressure_first"] == [0] * len(pressure)
    assert out["evictions"] >= len(pressure) * 2 - 6  # 16 chunks through 6 free slots
    assert out["pressure_again"] == 0  # evicted by the pressure
    assert out["pinned_again"] == 2 * chunk  # the pinned prefix survived
    assert out["index_pinned"] == 2 * chunk


SERVING = textwrap.dedent('''
    """One vLLM engine serving "tiny-chat" with kvcore: generates the prompts read from stdin
    (JSON lines), answers each with a line "kvcore-answer {json}" on stdout."""
    import json, sys
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt
    from kvcore_vllm.runtime import flush_all
    from kvcore_vllm.testing import drain

    if __name__ == "__main__":
        llm = LLM(model=sys.argv[1], served_model_name="tiny-chat", skip_tokenizer_init=True,
                  enforce_eager=True, max_model_len=4096, max_num_batched_tokens=4096, seed=0,
                  kv_cache_memory_bytes=128 << 20,
                  kv_transfer_config=KVTransferConfig(kv_connector="KVCoreConnector",
                                                      kv_role="kv_both"))
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True,
                                detokenize=False)
        print("kvcore-answer " + json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            prompt = json.loads(line)
            llm.reset_prefix_cache()  # vLLM's own cache off: hits can only come from kvcore
            out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params,
                               use_tqdm=False)[0]
            flush_all()
            drain(llm)
            print("kvcore-answer " + json.dumps({"cached": int(out.num_cached_tokens or 0),
                                                 "tokens": list(out.outputs[0].token_ids)}),
                  flush=True)
''')


class ServingEngine:
    """A vLLM engine in its own process, driven line by line; a thread drains its output (a
    full pipe would stall it)."""

    def __init__(self, script: Path, model: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, str(script), str(model)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.log: list[str] = []
        self.answers: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("kvcore-answer "):
                self.answers.put(json.loads(line.removeprefix("kvcore-answer ")))
            else:
                self.log.append(line)

    def answer(self, timeout: float = 300.0) -> dict[str, Any]:
        try:
            return self.answers.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("no answer from the engine:\n" + "".join(self.log[-80:])) from None

    def generate(self, prompt: list[int]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(prompt) + "\n")
        self.proc.stdin.flush()
        return self.answer()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(30)


def test_gateway_routes_by_served_model_name_across_two_engines(tmp_path: Path) -> None:
    """Engines A and B serve "tiny-chat"; each computed a different document. Asked with the
    name and a prompt's token ids only, the controller names the engine holding its prefix,
    which then hits in kvcore; the other engine recomputes, and both give the same tokens."""
    from kvcore.control.client import ControllerClient

    model = testing.build_tiny_llama(tmp_path / "llama", layers=2, hidden=256, heads=4,
                                     kv_heads=2, max_positions=4096)
    chunk = 256
    doc_a, doc_b = (testing.random_prompt(2 * chunk + 1, seed=s) for s in (21, 22))
    script = tmp_path / "serving.py"
    script.write_text(SERVING)
    proc, url = start_controller()
    engines: dict[str, ServingEngine] = {}
    try:
        for name in ("engine-a", "engine-b"):  # one after the other: the CPU has 2 cores
            engines[name] = ServingEngine(script, model, {
                **os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                "VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "TOKENIZERS_PARALLELISM": "false",
                "KVCORE_CHUNK_SIZE": str(chunk), "KVCORE_VERIFY_SAMPLE": "0",
                "KVCORE_CONTROLLER_URL": url, "KVCORE_CONTROLLER_TOKEN": TOKEN,
                "KVCORE_CONTROLLER_INSTANCE_ID": name, "KVCORE_CONTROLLER_HEARTBEAT_S": "0.2",
                "KVCORE_CONTROLLER_FLUSH_S": "0.05"})
            assert engines[name].answer()["ready"]
        a, b = engines["engine-a"], engines["engine-b"]
        assert a.generate(doc_a)["cached"] == 0
        assert b.generate(doc_b)["cached"] == 0

        gateway = ControllerClient(url)  # reads need no token unless the controller asks one
        deadline = time.monotonic() + 30
        routes: dict[str, Any] = {}
        while time.monotonic() < deadline:
            routes = {doc: gateway.route(None, prompt, model="tiny-chat")
                      for doc, prompt in (("a", doc_a), ("b", doc_b))}
            if routes["a"]["tokens"] and routes["b"]["tokens"]:
                break
            time.sleep(0.1)
        assert (routes["a"]["instance"], routes["a"]["tokens"]) == ("engine-a", 2 * chunk)
        assert (routes["b"]["instance"], routes["b"]["tokens"]) == ("engine-b", 2 * chunk)
        assert gateway.route(None, doc_a, model="tiny-chat", tenant="acme")["tokens"] == 0

        routed, other = engines[routes["a"]["instance"]], b
        hit, recomputed = routed.generate(doc_a), other.generate(doc_a)
        assert hit["cached"] == 2 * chunk and recomputed["cached"] == 0
        assert hit["tokens"] == recomputed["tokens"]

        def holders() -> dict[str, int]:
            (listed,) = gateway.namespaces(model="tiny-chat")  # A and B: the same namespace
            assert listed["served_as"][0] == "tiny-chat"
            assert listed["model"].startswith(str(model)) and listed["layout"] == "vllm-cpu"
            return {h["instance"]: h["chunks_by_tier"].get("cpu", 0)
                    for h in listed["instances"]}

        deadline = time.monotonic() + 30
        while holders() != {"engine-a": 2, "engine-b": 4} and time.monotonic() < deadline:
            time.sleep(0.1)
        assert holders() == {"engine-a": 2, "engine-b": 4}  # B now holds doc_a too
    finally:
        for engine in engines.values():
            engine.stop()
        proc.kill()
        proc.wait(10)
