"""kvcore's background threads yield the CPU to the engine's forward pass.

Stores, write-behind, prefetch, lower-tier reads, asynchronous loads and verification run
beside an engine that is computing. On a host with few cores their memory copies, checksums and
client decoding would otherwise slow the engine's own threads. On Linux every thread has its own
nice value; :func:`lower_priority` sets the calling thread's to the process's plus
``KVCORE_BACKGROUND_NICE`` (10 by default; 0 leaves it), once: a thread started by a lowered
thread inherits its value and is not lowered again. Work on the critical path (a synchronous
load, layer-wise loads the forward waits for) keeps the engine's priority.
"""

from __future__ import annotations

import os
import threading


def lower_priority(nice: int) -> bool:
    """Set the calling thread's nice value to the process's (its main thread's) plus ``nice``,
    unless it is that low already; False where that is not possible."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return False
    try:
        tid = threading.get_native_id()
        target = min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + nice)
        if os.getpriority(os.PRIO_PROCESS, tid) < target:
            os.setpriority(os.PRIO_PROCESS, tid, target)
    except OSError:
        return False
    return True


def thread_nice() -> int:
    """The calling thread's nice value (tests)."""
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
