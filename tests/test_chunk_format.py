"""Framing: any corruption, truncation or foreign key reads back as a miss."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from kvcore import chunk_format
from kvcore.testing.tier_contract import make_keys

KEYS = make_keys(2)


def framed(payload: bytes) -> bytearray:
    return bytearray(b"".join(bytes(p) for p in chunk_format.encode(KEYS[0], payload, 4)))


def test_round_trip() -> None:
    payload = os.urandom(5000)
    assert bytes(chunk_format.decode(KEYS[0], framed(payload))) == payload  # type: ignore[arg-type]


@settings(max_examples=200)
@given(st.binary(min_size=1, max_size=300), st.data())
def test_any_flipped_byte_is_detected(payload: bytes, data: st.DataObject) -> None:
    blob = framed(payload)
    index = data.draw(st.integers(0, len(blob) - 1))
    blob[index] ^= data.draw(st.integers(1, 255))
    assert chunk_format.decode(KEYS[0], blob) is None


@given(st.binary(min_size=1, max_size=300), st.data())
def test_truncation_is_detected(payload: bytes, data: st.DataObject) -> None:
    blob = framed(payload)
    cut = data.draw(st.integers(0, len(blob) - 1))
    assert chunk_format.decode(KEYS[0], blob[:cut]) is None


def test_foreign_key_is_a_miss() -> None:
    assert chunk_format.decode(KEYS[1], framed(b"payload")) is None
    assert chunk_format.decode(KEYS[0], None) is None
