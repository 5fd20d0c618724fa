"""Helpers for tests that start real servers: free loopback ports, stopping what we started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_mentioning(text: str) -> list[int]:
    """Pids (not ours) whose command line contains ``text``: e.g. a Ray temp dir, to check
    that everything a test started is gone."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def stop_group(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM the process group ``proc`` leads (start_new_session=True), SIGKILL if stuck.

    By pid, never by name: `ray stop` or `pkill mlflow` would also hit processes that are
    not ours.
    """
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
