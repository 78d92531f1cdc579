"""KV element types the codecs know, by the names a :class:`~kvcore.keys.Namespace` uses."""

from __future__ import annotations

import numpy as np

ELEMENT_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4,
                 "float8_e4m3fn": 1, "float8_e5m2": 1, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1,
                 "int8": 1, "uint8": 1}


def element_bytes(dtype: str) -> int:
    """Bytes per KV element of ``dtype`` (1 for a name kvcore does not know: byte-wise)."""
    return ELEMENT_BYTES.get(dtype.removeprefix("torch."), 1)


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """bfloat16 or float16 bytes (a uint8 array) as float32 values."""
    if dtype == "bfloat16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return raw.view(np.float16).astype(np.float32)


def from_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded (to nearest, ties to even) to bfloat16 or float16, as bytes."""
    if dtype == "bfloat16":
        bits = values.view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
        return (rounded >> np.uint32(16)).astype(np.uint16).view(np.uint8)
    return values.astype(np.float16).view(np.uint8)
