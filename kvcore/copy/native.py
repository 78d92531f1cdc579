"""ctypes bindings of the native copy libraries in ``kvcore/_native`` (plain C ABI, no libtorch).

``KVCORE_COPY_BACKEND=fallback`` skips them; ``KVCORE_NATIVE_DIR`` points at another build.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import numpy as np

from kvcore.copy.buffers import Plan
from kvcore.copy.settings import copy_settings

NATIVE_DIR = Path(__file__).resolve().parent.parent / "_native"
CPU_LIB = "libkvcopy_cpu.so"
CUDA_LIB = "libkvcopy_cuda.so"


class Layout(ctypes.Structure):
    _fields_ = [("segments", ctypes.c_int64), ("segment_bytes", ctypes.c_int64),
                ("block_stride", ctypes.c_int64), ("segment_stride", ctypes.c_int64)]


_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_COPY_ARGS: list[Any] = [ctypes.c_int, ctypes.POINTER(Layout), _P, _I64, _I64, _P, _P, _P,
                         _I64, _I64]

_libs: dict[str, ctypes.CDLL | None] = {}
errors: dict[str, str] = {}


def _dir() -> Path:
    return copy_settings().native_dir or Path(NATIVE_DIR)


def _disabled() -> bool:
    return copy_settings().copy_backend in ("fallback", "torch", "numpy")


def _load(name: str) -> ctypes.CDLL | None:
    if name in _libs:
        return _libs[name]
    lib = None
    path = _dir() / name
    if _disabled():
        errors[name] = "disabled by KVCORE_COPY_BACKEND"
    elif not path.exists():
        errors[name] = f"{path} not built"
    else:
        try:
            lib = ctypes.CDLL(str(path))
            if name == CPU_LIB:
                lib.kvcopy_cpu_copy.argtypes = _COPY_ARGS
                lib.kvcopy_cpu_copy.restype = ctypes.c_int
                lib.kvcopy_last_error.restype = ctypes.c_char_p
                lib.kvcopy_cpu_set_threads.argtypes = [ctypes.c_int]
            else:
                lib.kvcopy_cuda_copy.argtypes = _COPY_ARGS + [_P, ctypes.c_int]
                lib.kvcopy_cuda_copy.restype = ctypes.c_int
                lib.kvcopy_cuda_last_error.restype = ctypes.c_char_p
        except (OSError, AttributeError) as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
            lib = None
    _libs[name] = lib
    return lib


def cpu_lib() -> ctypes.CDLL | None:
    return _load(CPU_LIB)


def cuda_lib() -> ctypes.CDLL | None:
    return _load(CUDA_LIB)


_cuda_ok: bool | None = None


def cuda_usable() -> ctypes.CDLL | None:
    """The CUDA library if it loads and sees a GPU (checked once, at the first CUDA copy: the
    library's CUDA runtime may need a newer driver than torch's). Only call it once CUDA is in use:
    it initializes the driver, which must not happen in a parent process before fork."""
    global _cuda_ok
    lib = cuda_lib()
    if lib is None:
        return None
    if _cuda_ok is None:
        _cuda_ok = int(lib.kvcopy_cuda_device_count()) > 0
        if not _cuda_ok:
            errors[CUDA_LIB] = ("loaded but sees no GPU (driver older than the CUDA it was built "
                                "with?); using the torch fallback")
    return lib if _cuda_ok else None


def cpu_threads() -> int | None:
    lib = cpu_lib()
    return int(lib.kvcopy_cpu_threads()) if lib else None


def set_cpu_threads(threads: int) -> int:
    """Threads the native CPU copy uses (0: default, ``KVCORE_COPY_THREADS`` or min(cores, 4))."""
    lib = cpu_lib()
    if lib is None:
        raise RuntimeError("native CPU copy library is not loaded")
    return int(lib.kvcopy_cpu_set_threads(threads))


def _args(p: Plan) -> tuple:
    layers = np.array([m.ptr for m in p.layers], dtype=np.uint64)
    chunks = np.array([m.ptr for m in p.chunks], dtype=np.uint64)
    sizes = np.array([m.nbytes for m in p.chunks], dtype=np.int64)
    lay = p.layout
    c_layout = Layout(lay.segments, lay.segment_bytes, lay.block_stride, lay.segment_stride)
    keep = (layers, chunks, sizes, p.block_ids)
    args = (0 if p.gather else 1, ctypes.byref(c_layout), layers.ctypes.data, len(p.layers),
            p.extent, chunks.ctypes.data, sizes.ctypes.data, p.block_ids.ctypes.data,
            int(p.block_ids.size), p.k)
    return args, keep


def run_cpu(p: Plan) -> None:
    lib = cpu_lib()
    assert lib is not None
    args, keep = _args(p)
    rc = lib.kvcopy_cpu_copy(*args)
    if rc != 0:
        raise ValueError(f"native copy failed: {lib.kvcopy_last_error().decode()}")
    del keep


def run_cuda(p: Plan, stream: int, mode: int) -> None:
    lib = cuda_lib()
    assert lib is not None
    args, keep = _args(p)
    rc = lib.kvcopy_cuda_copy(*args, ctypes.c_void_p(stream), mode)
    if rc != 0:
        msg = lib.kvcopy_cuda_last_error().decode()
        error = ValueError if rc in (-1, -2, -3) else RuntimeError
        raise error(f"native CUDA copy failed: {msg}")
    del keep
