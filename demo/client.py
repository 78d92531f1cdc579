"""Streaming completion requests that measure time to first token on the client side."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import httpx

from demo.workloads import Request


@dataclass
class Result:
    request: Request
    ttft_s: float
    total_s: float
    text: str
    output_tokens: int


def complete(client: httpx.Client, url: str, request: Request) -> Result:
    """Send one streaming completion (greedy) and time its first token and its end."""
    body = {"model": "demo", "prompt": request.prompt, "max_tokens": request.max_tokens,
            "temperature": 0.0, "stream": True, "ignore_eos": True}
    started = time.perf_counter()
    first = None
    pieces: list[str] = []
    with client.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"server answered {response.status_code} for a "
                               f"{request.tokens}-token prompt: {response.text[:300]}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            text = chunk["choices"][0].get("text", "")
            if first is None:
                first = time.perf_counter()
            pieces.append(text)
    end = time.perf_counter()
    text = "".join(pieces)
    return Result(request, (first or end) - started, end - started, text, len(text.split()))
