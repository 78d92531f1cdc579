"""One NIXL agent per process, and registrations that are counted and always undone.

``nixl_cu12`` (the CUDA 12 wheel, importable without torch or a GPU) is tried first, then the
meta-package ``nixl``. The agent runs with strict thread synchronisation because the server,
the notification reaper and tier reads call it from different threads.

NIXL's own progress thread is off by default: its Python API starts it with a zero delay, so it
spins on a core for as long as the process lives. Inside a vLLM CPU worker, which pins all its
threads to the cores of its OpenMP pool, that spinning thread took half the worker's core and
starved the engine (start-up took minutes, transfers timed out). kvcore drives progress itself:
a reader polls its transfer, and :class:`~kvcore_nixl.server.ChunkServer` polls while leases
are live. ``KVCORE_NIXL_PROGRESS_THREAD=1`` turns NIXL's thread back on.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from typing import Any

import numpy as np

_lock = threading.Lock()
_shared: Agent | None = None


def load_nixl() -> Any:
    """The NIXL Python module; raises ImportError with the install command."""
    try:
        import nixl_cu12 as module
    except ImportError:
        try:
            from nixl import _api as module  # type: ignore[no-redef]
        except ImportError:
            raise ImportError(
                "kvcore-nixl needs NIXL: pip install --no-deps nixl-cu12==1.5.1"
            ) from None
    if not os.environ.get("NIXL_LOG_LEVEL"):
        logging.getLogger("nixl").setLevel(logging.WARNING)  # its INFO lines go to stdout
    return module


class Agent:
    """A NIXL agent plus a count of live memory registrations (for leak checks)."""

    def __init__(
        self, name: str | None = None, backend: str = "UCX", progress_thread: bool = False
    ) -> None:
        nixl = load_nixl()
        config = nixl.nixl_agent_config(
            enable_prog_thread=progress_thread, backends=[backend],
            sync_mode=nixl.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,
        )
        self.name = name or f"kvcore-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.backend = backend
        self.nixl = nixl.nixl_agent(self.name, config)
        self._count_lock = threading.Lock()
        self.registrations = 0

    def metadata(self) -> bytes:
        return self.nixl.get_agent_metadata()

    def register(self, regions: list[tuple[int, int]]) -> Any:
        """Register DRAM ``(address, length)`` regions; the result goes to :meth:`deregister`."""
        descs = self.nixl.register_memory([(a, n, 0, "") for a, n in regions], "DRAM")
        with self._count_lock:
            self.registrations += 1
        return descs

    def deregister(self, descs: Any) -> None:
        try:
            self.nixl.deregister_memory(descs)
        finally:
            with self._count_lock:
                self.registrations -= 1

    def partial_metadata(self, descs: Any) -> bytes:
        return self.nixl.get_partial_agent_metadata(descs, False)

    def xfer_descs(self, regions: list[tuple[int, int]]) -> Any:
        return self.nixl.get_xfer_descs([(a, n, 0) for a, n in regions], "DRAM")


def address_of(array: np.ndarray) -> int:
    return int(array.ctypes.data)


def shared_agent(backend: str = "UCX", progress_thread: bool = False) -> Agent:
    """The process-wide agent (created on first use, with the arguments of that first call)."""
    global _shared
    with _lock:
        if _shared is None:
            _shared = Agent(backend=backend, progress_thread=progress_thread)
        return _shared
