"""Lossy group quantization of bfloat16/float16 KV: ``int8`` and ``int4``.

Each run of ``group`` consecutive elements gets one float32 scale (its largest magnitude over
``qmax``) and each element the nearest integer of ``value / scale`` (ties to even), in
``[-qmax, qmax]``. The quantization is element-wise, so it commutes with any permutation of the
elements: it works on an engine's opaque block layout as long as the element type is known
(kvcore takes it from the chunk's :class:`~kvcore.keys.Namespace`, which the connectors build
from the engine's KV spec). Only consecutive elements share a scale: in vLLM's CPU layout a
group of 64 is one K channel over 64 tokens (K is stored channel-major inside a block, which
gives keys the per-channel scales they need) or one token's V head vector.

Encoded form::

    offset size field
    0      2    magic b"KQ"
    2      1    bits (8 or 4)
    3      1    element type (1 bfloat16, 2 float16)
    4      2    group size
    6      2    zero
    8      8    element count n
    16     4*g  float32 scales, g = ceil(n / group)
    ...         int8 values (n bytes) or int4 pairs (ceil(n / 2) bytes, low nibble first)

The native kernels in ``csrc/kvquant_cpu.cpp`` (bfloat16) and the numpy code here give
bit-identical bytes; decoding is deterministic, so a verifier can compare a loaded chunk with
``decode(encode(fresh))``.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from kvcore.codecs import native
from kvcore.codecs.dtypes import from_float32, to_float32
from kvcore.interfaces import Buffer, Codec, CodecError

HEAD = struct.Struct("<2sBBHxxQ")
MAGIC = b"KQ"
DTYPE_CODES = {"bfloat16": 1, "float16": 2}
DTYPE_NAMES = {code: name for name, code in DTYPE_CODES.items()}


def _value_bytes(bits: int, count: int) -> int:
    return count if bits == 8 else (count + 1) // 2


class GroupQuantCodec(Codec):
    """Symmetric per-group quantization to ``bits`` (8 or 4) bits, float32 scales."""

    lossy = True

    def __init__(self, name: str, bits: int, group: int) -> None:
        if bits not in (4, 8) or not 0 < group < 2**16 or group % 2:
            raise ValueError("bits must be 4 or 8 and group an even size below 65536")
        self.name = name
        self.bits = bits
        self.group = group
        self.qmax = 127 if bits == 8 else 7

    def encoded_nbytes(self, count: int) -> int:
        return HEAD.size + 4 * math.ceil(count / self.group) + _value_bytes(self.bits, count)

    # -- encode ------------------------------------------------------------------------------

    def encode(self, raw: memoryview, dtype: str) -> Buffer | None:
        dtype = dtype.removeprefix("torch.")
        if dtype not in DTYPE_CODES or raw.nbytes % 2 or raw.nbytes == 0:
            return None
        count = raw.nbytes // 2
        out = np.empty(self.encoded_nbytes(count), dtype=np.uint8)
        HEAD.pack_into(out.data, 0, MAGIC, self.bits, DTYPE_CODES[dtype], self.group, count)
        groups = math.ceil(count / self.group)
        scales = out[HEAD.size : HEAD.size + 4 * groups].view(np.float32)
        values = out[HEAD.size + 4 * groups :]
        src = np.frombuffer(raw, dtype=np.uint8)
        done = native.encode(src, self.bits, self.group, dtype, scales, values)
        if done is None:
            done = self._encode_numpy(src, dtype, scales, values)
        return out.data if done else None

    def _encode_numpy(self, src: np.ndarray, dtype: str, scales: np.ndarray,
                      values: np.ndarray) -> bool:
        x = to_float32(src, dtype)
        count = x.size
        padded = np.zeros(scales.size * self.group, dtype=np.float32)
        padded[:count] = x
        grouped = padded.reshape(scales.size, self.group)
        absmax = np.abs(grouped).max(axis=1)
        if not np.isfinite(absmax).all():
            return False  # inf or NaN in the KV: store it raw
        np.divide(absmax, np.float32(self.qmax), out=scales)
        inverse = np.zeros_like(scales)
        with np.errstate(divide="ignore", over="ignore"):
            np.divide(np.float32(1.0), scales, out=inverse, where=scales > 0)
        tiny = ~np.isfinite(inverse)  # a group of values below ~1e-36: stored as zeros
        scales[tiny] = 0
        inverse[tiny] = 0
        q = np.rint(grouped * inverse[:, None]).reshape(-1)[:count]
        np.clip(q, -self.qmax, self.qmax, out=q)
        q8 = q.astype(np.int8)
        if self.bits == 8:
            values[:] = q8.view(np.uint8)
        else:
            nibbles = np.zeros(values.size * 2, dtype=np.uint8)
            nibbles[:count] = q8.view(np.uint8) & np.uint8(0x0F)
            values[:] = nibbles[0::2] | (nibbles[1::2] << np.uint8(4))
        return True

    # -- decode ------------------------------------------------------------------------------

    def decode(self, encoded: memoryview, raw_nbytes: int) -> Buffer:
        data = np.frombuffer(encoded, dtype=np.uint8)
        if data.nbytes < HEAD.size:
            raise CodecError(f"{self.name}: {data.nbytes} bytes is shorter than its header")
        magic, bits, code, group, count = HEAD.unpack_from(encoded, 0)
        dtype = DTYPE_NAMES.get(code)
        if magic != MAGIC or bits != self.bits or group != self.group or dtype is None:
            raise CodecError(f"{self.name}: not this codec's data (magic {magic!r}, "
                             f"{bits} bits, group {group}, type {code})")
        if count * 2 != raw_nbytes or self.encoded_nbytes(count) != data.nbytes:
            raise CodecError(f"{self.name}: {count} elements do not fit {data.nbytes} encoded "
                             f"and {raw_nbytes} raw bytes")
        groups = math.ceil(count / self.group)
        scales = data[HEAD.size : HEAD.size + 4 * groups].view(np.float32)
        values = data[HEAD.size + 4 * groups :]
        if not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise CodecError(f"{self.name}: a scale is negative or not finite")
        out = np.empty(raw_nbytes, dtype=np.uint8)
        if not native.decode(values, scales, self.bits, self.group, dtype, out):
            self._decode_numpy(values, scales, count, dtype, out)
        return out.data

    def _decode_numpy(self, values: np.ndarray, scales: np.ndarray, count: int, dtype: str,
                      out: np.ndarray) -> None:
        if self.bits == 8:
            q = values.view(np.int8).astype(np.float32)
        else:
            nibbles = np.empty(values.size * 2, dtype=np.int8)
            nibbles[0::2] = (values << np.uint8(4)).view(np.int8) >> np.int8(4)
            nibbles[1::2] = values.view(np.int8) >> np.int8(4)
            q = nibbles[:count].astype(np.float32)
        per_element = np.repeat(scales, self.group)[:count]
        out[:] = from_float32(q * per_element, dtype)
