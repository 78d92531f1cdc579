"""kvcore's background threads yield the CPU to the engine's forward pass.

Stores, write-behind, prefetch, lower-tier reads, asynchronous loads and verification run
beside an engine that is computing. On a host with few cores their memory copies, checksums and
client decoding would otherwise slow the engine's own threads. On Linux every thread has its own
nice value; :func:`lower_priority` raises the calling thread's by ``KVCORE_BACKGROUND_NICE``
(10 by default; 0 leaves it). Work on the critical path (a synchronous load, layer-wise loads the
forward waits for) keeps the engine's priority.
"""

from __future__ import annotations

import os
import threading


def lower_priority(nice: int) -> bool:
    """Raise the calling thread's nice value by ``nice``; False where that is not possible."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return False
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + nice))
    except OSError:
        return False
    return True


def thread_nice() -> int:
    """The calling thread's nice value (tests)."""
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
