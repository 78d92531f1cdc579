"""Helpers for end-to-end tests and benchmarks that run a real vLLM engine with kvcore.

Other plugins (LMDB, Redis, controller, NIXL) reuse these:

- :func:`build_tiny_llama` writes a small random-weight Llama (safetensors) plus a local
  WordLevel tokenizer, so no hub access is needed;
- :func:`random_prompt` makes token-id prompts over that vocabulary;
- :func:`run_engine` runs one vLLM ``LLM`` in a fresh Python process (spawn-safe: the child is
  ``python -m kvcore_vllm.testing``) through a list of steps, and returns outputs, timings, the
  engine's cached-token counts and kvcore's stats. Pass ``KVCORE_*`` settings through ``env``.

Example::

    model = build_tiny_llama(tmp_path / "llama")
    prompt = random_prompt(4 * 256 + 1, seed=1)
    result = run_engine(model, [Step([prompt]), Step([prompt], reset_prefix_cache=True)],
                        env={"KVCORE_CPU_SIZE": "1GiB"})
    assert result.steps[1].num_cached_tokens[0] == 4 * 256

The child runs the engine core in its own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the
connector's process-wide CacheEngine is the one the child reports on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

VOCAB_SIZE = 32000
FIRST_WORD_ID = 3
"""Ids 0..2 are <unk>, <s>, </s>; words are ``w3`` .. ``w31999``."""


def build_tiny_llama(
    directory: str | os.PathLike[str],
    layers: int = 4,
    hidden: int = 1024,
    heads: int = 16,
    kv_heads: int = 8,
    intermediate: int | None = None,
    max_positions: int = 16384,
    seed: int = 0,
) -> Path:
    """Write a random-weight Llama (bf16 safetensors) and a WordLevel tokenizer to ``directory``.

    Reuses an existing build with the same parameters. Returns the directory.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(directory)
    params = {"layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads,
              "intermediate": intermediate, "max_positions": max_positions, "seed": seed}
    stamp = path / "kvcore_tiny_llama.json"
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        return path
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        dtype="bfloat16",
    )
    model: Any = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(FIRST_WORD_ID, VOCAB_SIZE)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=max_positions)
    fast.save_pretrained(path)
    stamp.write_text(json.dumps(params))
    return path


def random_prompt(length: int, seed: int) -> list[int]:
    """``length`` random word ids (never special tokens), reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    return rng.integers(FIRST_WORD_ID, VOCAB_SIZE, size=length).tolist()


@dataclass
class Step:
    """One ``LLM.generate`` call of a :func:`run_engine` run."""

    prompts: list[list[int]]
    max_tokens: int = 4
    cache_salts: list[str | None] | None = None
    reset_prefix_cache: bool = False
    """Drop vLLM's own prefix cache before this step (kvcore keeps its copy)."""
    flush_kvcore: bool = True
    """Wait for kvcore's queued stores after this step (so the next step can hit)."""
    label: str = ""
    pause_s: float = 0.0
    """Keep the engine idle this long after the step (a test acts on it meanwhile)."""
    kill_after: bool = False
    """SIGKILL the engine's process after this step (and its flush): a crash, no clean-up."""


@dataclass
class StepResult:
    label: str
    outputs: list[list[int]]
    num_cached_tokens: list[int]
    seconds: float
    """Wall time of the ``generate`` call (TTFT when one prompt runs with ``max_tokens=1``)."""
    ttft: list[float]
    """Per request time to first token as the engine measured it (0 when not reported)."""


@dataclass
class EngineResult:
    steps: list[StepResult]
    kvcore: dict[str, Any] = field(default_factory=dict)
    """``CacheEngine.stats()`` of the connector's engine at the end (empty without connector)."""
    connector: dict[str, Any] = field(default_factory=dict)
    """The connector's own counters (loads, stores, load errors, ...)."""
    prometheus: str = ""
    """The ``kvcore_*`` samples of the child's default Prometheus registry (vLLM's /metrics)."""
    log: str = ""


def run_engine(
    model: str | os.PathLike[str],
    steps: list[Step],
    connector: bool = True,
    module_path: str | None = None,
    env: dict[str, str] | None = None,
    llm_kwargs: dict[str, Any] | None = None,
    extra_config: dict[str, Any] | None = None,
    setup: str | None = None,
    timeout: float = 600.0,
    multi_connector: bool = False,
) -> EngineResult:
    """Run ``steps`` on one fresh vLLM engine in a child process; raise with its log on failure.

    ``connector=False`` runs plain vLLM (the baseline). ``module_path="kvcore_vllm"`` loads the
    connector by module path instead of the registered name. ``setup="module:function"`` is
    called in the child before the engine starts (for example
    ``"kvcore_vllm.testing:register_faulty_tiers"``). ``multi_connector=True`` runs kvcore as
    the only child of vLLM's MultiConnector.
    """
    spec = {
        "model": str(model),
        "connector": connector,
        "module_path": module_path,
        "llm_kwargs": llm_kwargs or {},
        "extra_config": extra_config or {},
        "setup": setup,
        "multi_connector": multi_connector,
        "steps": [asdict(s) for s in steps],
    }
    child_env = dict(os.environ)
    child_env.update({
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # Tests and benchmarks assert or time every hit: no request is sampled to be recomputed
        # for verification unless ``env`` asks for it.
        "KVCORE_VERIFY_SAMPLE": "0",
    })
    child_env.update(env or {})
    with tempfile.TemporaryDirectory(prefix="kvcore-vllm-run-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run(
            [sys.executable, "-m", "kvcore_vllm.testing", str(spec_path), str(out_path)],
            env=child_env, capture_output=True, text=True, timeout=timeout,
        )
        log = proc.stdout + proc.stderr
        if proc.returncode != 0 or not out_path.exists():
            raise RuntimeError(f"vLLM run failed (exit {proc.returncode}):\n{log[-6000:]}")
        data = json.loads(out_path.read_text())
    return EngineResult(
        steps=[StepResult(**s) for s in data["steps"]],
        kvcore=data.get("kvcore", {}),
        connector=data.get("connector", {}),
        prometheus=data.get("prometheus", ""),
        log=log,
    )


def _child(spec_path: str, out_path: str) -> None:
    """The child process: build the LLM, run the steps, write the results as JSON."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(Path(spec_path).read_text())
    if spec.get("setup"):
        import importlib

        module_name, _, function = spec["setup"].partition(":")
        getattr(importlib.import_module(module_name), function)()
    kwargs: dict[str, Any] = {
        "model": spec["model"],
        "skip_tokenizer_init": True,
        "enforce_eager": True,
        "max_model_len": 16384,
        "max_num_batched_tokens": 16384,
        "seed": 0,
        "kv_cache_memory_bytes": 1 << 30,
    }
    kwargs.update(spec["llm_kwargs"])
    if isinstance(kwargs.get("kv_events_config"), dict):  # vLLM's own KV events (JSON spec)
        from vllm.config import KVEventsConfig

        kwargs["kv_events_config"] = KVEventsConfig(**kwargs["kv_events_config"])
    if spec["connector"]:
        from vllm.config import KVTransferConfig

        child = {"kv_connector": "KVCoreConnector", "kv_role": "kv_both",
                 "kv_connector_module_path": spec["module_path"],
                 "kv_connector_extra_config": spec["extra_config"]}
        if spec.get("multi_connector"):
            kwargs["kv_transfer_config"] = KVTransferConfig(
                kv_connector="MultiConnector", kv_role="kv_both",
                kv_connector_extra_config={"connectors": [child]})
        else:
            kwargs["kv_transfer_config"] = KVTransferConfig(**child)
    llm = LLM(**kwargs)
    results = []
    for step in spec["steps"]:
        if step["reset_prefix_cache"]:
            llm.reset_prefix_cache()
        params = SamplingParams(max_tokens=step["max_tokens"], temperature=0.0,
                                ignore_eos=True, detokenize=False)
        salts = step["cache_salts"] or [None] * len(step["prompts"])
        prompts = []
        for ids, salt in zip(step["prompts"], salts):
            prompt = TokensPrompt(prompt_token_ids=ids)
            if salt is not None:
                prompt["cache_salt"] = salt
            prompts.append(prompt)
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - started
        if step["flush_kvcore"]:
            _flush_connector()
            drain(llm)
            _flush_connector()  # what the drained steps stored or verified
        time.sleep(step["pause_s"])
        if step.get("kill_after"):
            os.kill(os.getpid(), signal.SIGKILL)
        results.append({
            "label": step["label"],
            "outputs": [list(o.outputs[0].token_ids) for o in outputs],
            "num_cached_tokens": [int(o.num_cached_tokens or 0) for o in outputs],
            "seconds": seconds,
            "ttft": [float(getattr(o.metrics, "first_token_latency", 0.0) or 0.0)
                     for o in outputs],
        })
    report = _connector_report()
    Path(out_path).write_text(json.dumps({"steps": results, **report,
                                          "prometheus": _kvcore_samples()}))


def drain(llm: Any) -> None:
    """Step the in-process engine until finished requests released their blocks."""
    core = getattr(llm.llm_engine, "engine_core", None)
    inner = getattr(core, "engine_core", None)
    scheduler = getattr(inner, "scheduler", None)
    for _ in range(1000):
        if core is None or scheduler is None or not scheduler.has_finished_requests():
            return
        core.get_output()
        time.sleep(0.002)


def reset_prefix_cache(llm: Any) -> None:
    """Drop vLLM's prefix cache (the next hits come from kvcore), once the blocks that finished
    requests' stores held are free; raise when vLLM keeps it."""
    for _ in range(100):
        drain(llm)
        if llm.reset_prefix_cache():
            return
        time.sleep(0.05)
    raise RuntimeError("vLLM kept its prefix cache: hits would not come from kvcore")


def _flush_connector() -> None:
    try:
        from kvcore_vllm.runtime import flush_all

        flush_all()
    except Exception:
        pass


def _kvcore_samples() -> str:
    from prometheus_client import REGISTRY, generate_latest

    text = generate_latest(REGISTRY).decode()
    return "".join(line + "\n" for line in text.splitlines() if line.startswith("kvcore_"))


def _connector_report() -> dict[str, Any]:
    try:
        from kvcore_vllm.runtime import report

        return report()
    except Exception as exc:
        return {"kvcore": {"error": repr(exc)}}


# -- faulty tiers, registered through kvcore's plugin hooks -------------------------------------


class FaultyTier:
    """A lower tier that keeps values in memory but fails or slows down on read.

    ``mode="corrupt"``: ``get`` returns the stored bytes with one byte flipped (kvcore's checksum
    must turn this into a miss). ``mode="raise"``: every call but ``put`` raises.
    ``mode="slow"``: ``get`` returns intact values after 0.2 s (a remote tier).
    """

    framed = True

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.values: dict[bytes, bytes] = {}

    def contains(self, keys: Any) -> list[bool]:
        if self.mode == "raise":
            raise OSError("faulty tier: contains failed")
        return [k in self.values for k in keys]

    def get(self, keys: Any) -> list[Any]:
        if self.mode == "raise":
            raise OSError("faulty tier: get failed")
        if self.mode == "slow":
            time.sleep(0.2)
            return [self.values.get(k) for k in keys]
        out: list[Any] = []
        for key in keys:
            value = self.values.get(key)
            if value is not None:
                broken = bytearray(value)
                broken[len(broken) // 2] ^= 0xFF
                value = bytes(broken)
            out.append(value)
        return out

    def put(self, items: Any) -> list[bool]:
        for key, parts in items:
            self.values[key] = b"".join(bytes(p) for p in parts)
        return [True] * len(items)

    def delete(self, keys: Any) -> int:
        if self.mode == "raise":
            raise OSError("faulty tier: delete failed")
        return sum(self.values.pop(k, None) is not None for k in keys)

    def usage(self) -> Any:
        from kvcore.interfaces import TierUsage

        return TierUsage(sum(len(v) for v in self.values.values()), 1 << 40, len(self.values))

    def iter_keys(self) -> Any:
        return iter(list(self.values))

    def pin(self, keys: Any) -> int:
        return 0

    def unpin(self, keys: Any) -> int:
        return 0

    def close(self) -> None:
        self.values.clear()


class _FaultyTierPlugin:
    """Registers ``faulty-corrupt`` and ``faulty-raise`` through ``kvcore_register_tiers``."""

    from kvcore.hookspecs import hookimpl as _hookimpl

    @staticmethod
    @_hookimpl
    def kvcore_register_tiers(register: Any) -> None:
        from kvcore.interfaces import Tier

        for mode in ("corrupt", "raise", "slow"):
            cls = type(f"Faulty{mode.title()}Tier", (FaultyTier, Tier), {})
            register(f"faulty-{mode}", lambda context, cls=cls, mode=mode: cls(mode))


def inject_late_chunk_once() -> None:
    """Setup for :func:`run_engine`: the first lease of two or more chunks comes back with only
    its first chunk, once (the rest is late: evicted, a slow tier, a rank missing its shard).
    Also registers the faulty tiers."""
    from kvcore.engine import CacheEngine

    register_faulty_tiers()
    real = CacheEngine.acquire
    fired: list[bool] = []

    def acquire(self: Any, keys: Any, timeout_s: float | None = None,
                request_id: str | None = None, first_chunk: int = 0) -> Any:
        lease = real(self, keys, timeout_s, request_id, first_chunk)
        if not fired and len(lease) >= 2:
            fired.append(True)
            self.memory.release(lease.views[1:])
            lease.keys, lease.views = lease.keys[:1], lease.views[:1]
        return lease

    CacheEngine.acquire = acquire  # type: ignore[method-assign]


def register_faulty_tiers() -> None:
    """Make the tier names ``faulty-corrupt``, ``faulty-raise`` and ``faulty-slow`` available
    (``KVCORE_TIERS``)."""
    from kvcore.plugins import get_registry

    registry = get_registry()
    if "faulty-corrupt" not in registry.tiers:
        registry.register_module(_FaultyTierPlugin(), name="kvcore-vllm-faulty-tiers")


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
