"""Multi-turn chats on a real vLLM engine (with its tokenizer and chat template), in a child
process.

:func:`run_engine` in :mod:`kvcore_vllm.testing` sends fixed token-id prompts; a chat needs the
model's own answers in the next turn's prompt, so this runner keeps the conversations in the
child: each turn, every conversation gets its next user message, the batch goes through
``LLM.chat`` (greedy), and the answers join the histories. With ``reset_prefix_cache`` vLLM's own
prefix cache is dropped between turns, so what a later turn finds cached came from kvcore.

Example (SmolLM2 from :mod:`kvcore_vllm.smollm`)::

    chats = [Chat(system="Be brief.", turns=["Text: ... Who wrote it?", "When?"])]
    with_kv = run_chat(build_smollm(), chats, connector=True, reset_prefix_cache=True)
    alone = run_chat(build_smollm(), chats, connector=False)
    assert with_kv.answers() == alone.answers()
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Chat:
    """One conversation: a system prompt and the user's messages, one per turn."""

    system: str
    turns: list[str]


@dataclass
class TurnResult:
    """One answer of one conversation."""

    chat: int
    turn: int
    prompt_tokens: int
    num_cached_tokens: int
    """Prompt tokens the engine did not compute (its prefix cache plus kvcore's)."""
    answer_token_ids: list[int]
    answer: str


@dataclass
class ChatResult:
    turns: list[TurnResult]
    seconds: list[float]
    """Wall time of each turn's batch."""
    connector: dict[str, Any] = field(default_factory=dict)
    kvcore: dict[str, Any] = field(default_factory=dict)
    log: str = ""

    def answers(self) -> list[list[int]]:
        """Answer token ids, in (turn, chat) order."""
        return [t.answer_token_ids for t in self.turns]


def run_chat(
    model: str | os.PathLike[str],
    chats: list[Chat],
    connector: bool = True,
    reset_prefix_cache: bool = False,
    max_tokens: int = 32,
    env: dict[str, str] | None = None,
    llm_kwargs: dict[str, Any] | None = None,
    timeout: float = 600.0,
) -> ChatResult:
    """Run every chat turn by turn on one fresh vLLM engine; raise with its log on failure."""
    spec = {"model": str(model), "connector": connector, "reset": reset_prefix_cache,
            "max_tokens": max_tokens, "llm_kwargs": llm_kwargs or {},
            "chats": [asdict(c) for c in chats]}
    child_env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                 "VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "TOKENIZERS_PARALLELISM": "false",
                 **(env or {})}
    with tempfile.TemporaryDirectory(prefix="kvcore-vllm-chat-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, "-m", "kvcore_vllm.chat", str(spec_path),
                               str(out_path)], env=child_env, capture_output=True, text=True,
                              timeout=timeout)
        log = proc.stdout + proc.stderr
        if proc.returncode != 0 or not out_path.exists():
            raise RuntimeError(f"vLLM chat run failed (exit {proc.returncode}):\n{log[-6000:]}")
        data = json.loads(out_path.read_text())
    return ChatResult(turns=[TurnResult(**t) for t in data["turns"]], seconds=data["seconds"],
                      connector=data.get("connector", {}), kvcore=data.get("kvcore", {}), log=log)


def _child(spec_path: str, out_path: str) -> None:
    """The child process: one LLM, the chats turn by turn, results as JSON."""
    from vllm import LLM, SamplingParams

    from kvcore_vllm.testing import _connector_report, _flush_connector, drain

    spec = json.loads(Path(spec_path).read_text())
    kwargs: dict[str, Any] = {"model": spec["model"], "dtype": "bfloat16", "enforce_eager": True,
                              "max_model_len": 8192, "seed": 0,
                              "kv_cache_memory_bytes": 512 << 20}
    kwargs.update(spec["llm_kwargs"])
    if spec["connector"]:
        from vllm.config import KVTransferConfig

        kwargs["kv_transfer_config"] = KVTransferConfig(kv_connector="KVCoreConnector",
                                                        kv_role="kv_both")
    llm = LLM(**kwargs)
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0)
    chats = spec["chats"]
    histories = [[{"role": "system", "content": c["system"]}] for c in chats]
    turns: list[dict[str, Any]] = []
    seconds: list[float] = []
    for turn in range(max(len(c["turns"]) for c in chats)):
        active = [i for i, c in enumerate(chats) if turn < len(c["turns"])]
        for i in active:
            histories[i].append({"role": "user", "content": chats[i]["turns"][turn]})
        if spec["reset"] and turn > 0:
            llm.reset_prefix_cache()
        started = time.perf_counter()
        outputs = llm.chat([histories[i] for i in active], params,  # type: ignore[arg-type]
                           use_tqdm=False)
        seconds.append(time.perf_counter() - started)
        _flush_connector()
        drain(llm)
        for i, output in zip(active, outputs):
            answer = output.outputs[0]
            histories[i].append({"role": "assistant", "content": answer.text})
            turns.append({"chat": i, "turn": turn,
                          "prompt_tokens": len(output.prompt_token_ids or ()),
                          "num_cached_tokens": int(output.num_cached_tokens or 0),
                          "answer_token_ids": list(answer.token_ids), "answer": answer.text})
    Path(out_path).write_text(json.dumps({"turns": turns, "seconds": seconds,
                                          **_connector_report()}))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
