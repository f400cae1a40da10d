"""Stopping what is left running in a lab's namespaces, by pid and start
time so a reused pid is never signalled."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from pyroute2 import netns


def kill_ns_processes(namespaces: Sequence[str], grace: float = 2.0) -> None:
    """Stop processes still running in the lab's namespaces (e.g. a relayd the
    demo started): they would keep the namespace, its veths and XDP alive."""
    pids = [pid for ns, ps in netns.ns_pids().items() if ns in namespaces for pid in ps
            if pid != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            if pids:
                time.sleep(0.02)
        if not pids:
            return


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of a process from
    /proc/PID/stat, or None when it is gone. The start time tells a reused pid
    from the process it once named."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    # A zombie counts as gone; reaping it is its parent's business (a Popen
    # of the caller must still see the real exit status).
    st = proc_stat(pid)
    return st is not None and st[0] != "Z"
