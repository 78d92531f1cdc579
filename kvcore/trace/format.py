"""The Mooncake trace format: one JSON object per line.

``{"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, ...]}``

``hash_ids`` are prefix-block hashes, one per 512-token block of the input (the last block may be
partial): equal ids mean the same prefix, so they are already chained. A malformed record raises
:class:`TraceError` naming the file and the line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

BLOCK_TOKENS = 512
"""Tokens per block of the Mooncake traces."""


class TraceError(ValueError):
    """A trace file cannot be read; the message names the line and what is wrong."""


@dataclass(frozen=True, slots=True)
class Request:
    """One request of a trace."""

    timestamp: int
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def _int_field(record: dict, name: str, where: str, default: int | None = None) -> int:
    value = record.get(name, default)
    if value is None:
        raise TraceError(f"{where}: missing field {name!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 \
            or value != int(value):
        raise TraceError(f"{where}: field {name!r} must be a non-negative integer, not {value!r}")
    return int(value)


def parse_record(line: str, where: str) -> Request:
    """One line of a trace as a :class:`Request`; ``where`` names it in errors."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise TraceError(f"{where}: expected a JSON object, not {type(record).__name__}")
    ids = record.get("hash_ids")
    if not isinstance(ids, list):
        raise TraceError(f"{where}: field 'hash_ids' must be a list of integers")
    for value in ids:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TraceError(f"{where}: 'hash_ids' holds {value!r}; expected non-negative integers")
    input_length = _int_field(record, "input_length", where, len(ids) * BLOCK_TOKENS)
    return Request(
        timestamp=_int_field(record, "timestamp", where, 0),
        input_length=input_length,
        output_length=_int_field(record, "output_length", where, 0),
        hash_ids=tuple(ids),
    )


def parse_trace(lines: Iterable[str], name: str = "<trace>") -> list[Request]:
    """Requests of a trace given as lines (blank lines are skipped)."""
    requests = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            requests.append(parse_record(line, f"{name}, line {number}"))
    return requests


def load_trace(path: str | Path) -> list[Request]:
    """Requests of a trace file, in file order."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as handle:
            return parse_trace(handle, str(path))
    except OSError as exc:
        raise TraceError(f"{path}: cannot read the trace ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path}: not UTF-8 text ({exc.reason})") from None
