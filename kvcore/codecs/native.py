"""ctypes bindings of the native group-quantization kernels (``csrc/kvquant_cpu.cpp``, built
into the CPU copy library). bfloat16 only; ``None``/``False`` tells the caller to use numpy."""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from kvcore.copy.native import cpu_lib

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_bound: dict[str, Any] = {}


def _lib() -> Any:
    if "lib" not in _bound:
        lib = cpu_lib()
        if lib is not None and hasattr(lib, "kvquant_bf16_encode"):
            lib.kvquant_bf16_encode.argtypes = [_P, _I64, ctypes.c_int, _I64, _P, _P]
            lib.kvquant_bf16_encode.restype = ctypes.c_int
            lib.kvquant_bf16_decode.argtypes = [_P, _P, _I64, ctypes.c_int, _I64, _P]
            lib.kvquant_bf16_decode.restype = ctypes.c_int
        else:
            lib = None
        _bound["lib"] = lib
    return _bound["lib"]


def available() -> bool:
    """Whether the native kernels are built and loaded."""
    return _lib() is not None


def _ptr(a: np.ndarray) -> int:
    return int(a.ctypes.data)


def encode(src: np.ndarray, bits: int, group: int, dtype: str, scales: np.ndarray,
           values: np.ndarray) -> bool | None:
    """Quantize ``src`` into ``scales`` and ``values``: True, False (a non-finite element: store
    raw), or None (no native kernel for this case)."""
    lib = _lib()
    if lib is None or dtype != "bfloat16":
        return None
    rc = lib.kvquant_bf16_encode(_ptr(src), src.nbytes // 2, bits, group, _ptr(scales),
                                 _ptr(values))
    return rc == 0


def decode(values: np.ndarray, scales: np.ndarray, bits: int, group: int, dtype: str,
           out: np.ndarray) -> bool:
    """Dequantize into ``out``; False when no native kernel applies."""
    lib = _lib()
    if lib is None or dtype != "bfloat16":
        return False
    rc = lib.kvquant_bf16_decode(_ptr(values), _ptr(scales), out.nbytes // 2, bits, group,
                                 _ptr(out))
    return rc == 0
