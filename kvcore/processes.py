"""Facts about other processes on this host (used to tell a crashed peer from a slow one)."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists (in this pid namespace), ours or not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pid_namespace() -> str:
    """This process's pid namespace (``/proc/self/ns/pid``), empty where unknown: pids of two
    processes compare only within one."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
