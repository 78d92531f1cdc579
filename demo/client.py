"""Streaming requests to vLLM's OpenAI API that time the first token on the client side."""

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
    prompt_tokens: int
    output_tokens: int


def send(client: httpx.Client, url: str, request: Request) -> Result:
    """One streaming, greedy request: chat (``messages``) or completion (token-id ``prompt``).

    TTFT is the time until the first chunk that carries generated text.
    """
    body: dict = {"model": "demo", "max_tokens": request.max_tokens, "temperature": 0.0,
                  "stream": True, "stream_options": {"include_usage": True}}
    if request.messages is not None:
        path, body["messages"] = "/v1/chat/completions", request.messages
    else:
        path, body["prompt"], body["ignore_eos"] = "/v1/completions", request.prompt, True
    started = time.perf_counter()
    first = None
    pieces: list[str] = []
    usage: dict = {}
    with client.stream("POST", f"{url}{path}", json=body, timeout=900) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"server answered {response.status_code}: {response.text[:300]}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                text = choice.get("delta", {}).get("content") or choice.get("text") or ""
                if text and first is None:
                    first = time.perf_counter()
                pieces.append(text)
    end = time.perf_counter()
    return Result(request, (first or end) - started, end - started, "".join(pieces),
                  int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)))
