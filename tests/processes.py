"""Helpers for tests that start real servers: free loopback ports, stopping what we started."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


def _listening_inodes() -> dict[int, tuple[str, int]]:
    """Socket inode -> (address, port) of every listening TCP socket (IPv4, IPv6), from /proc."""
    found = {}
    for family, table in ((socket.AF_INET, "/proc/net/tcp"), (socket.AF_INET6, "/proc/net/tcp6")):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            hexaddr, hexport = fields[1].split(":")
            raw = bytes.fromhex(hexaddr)  # each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found[int(fields[9])] = (socket.inet_ntop(family, raw), int(hexport, 16))
    return found


def session_pids(sid: int) -> list[int]:
    """Pids of the session ``sid`` (a process started with start_new_session=True)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def listening_sockets(sid: int) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of session ``sid``'s
    processes: what another machine could connect to."""
    inodes = _listening_inodes()
    out = set()
    for pid in session_pids(sid):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and int(target[8:-1]) in inodes:
                    out.add((name, *inodes[int(target[8:-1])]))
        except OSError:  # exited meanwhile
            continue
    return sorted(out)


def is_loopback(address: str) -> bool:
    return address in ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def descendants(pid: int) -> dict[int, str]:
    """{pid: cmdline} of every process under ``pid`` (from /proc; no psutil needed)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parent[int(entry.name)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = {}, [pid]
    while frontier:
        p = frontier.pop()
        for child, ppid in parent.items():
            if ppid == p and child not in out:
                try:
                    cmd = (Path("/proc") / str(child) / "cmdline").read_bytes()
                except OSError:
                    continue
                out[child] = cmd.replace(b"\0", b" ").decode(errors="replace")
                frontier.append(child)
    return out


def train_workers(under: int) -> set[int]:
    """Pids of the Ray Train worker processes under ``under`` (a driver, a raylet); not a
    worker's own fork, which carries the worker's title until it execs."""
    titled = {p for p, cmd in descendants(under).items() if "RayTrainWorker" in cmd}
    return titled - {child for p in titled for child in descendants(p)}


@contextmanager
def started_ray_head(
    env: dict[str, str],
    ready: Callable[[int, int], bool],
    *,
    num_cpus: int = 2,
    extra: tuple[str, ...] = (),
    grace: float = 60,
) -> Iterator[tuple[subprocess.Popen, int, int]]:
    """A `ray start --head --block` on 127.0.0.1 with its own temp dir, stopped by its pid.

    ``env`` must carry ``local_ray_settings`` (every port on loopback). Yields the `ray
    start` process, its GCS port and its dashboard port once ``ready(gcs, dashboard)``.
    `ray stop` would end every Ray on the machine, not just this head: on exit the head is
    terminated, then anything that mentions its temp dir is killed.
    """
    temp = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray's socket paths have a limit
    dash, gcs = free_port(), free_port()
    head = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            # the agent's default port (52365) is one per machine: two heads would collide
            f"--dashboard-agent-listen-port={free_port()}",
            f"--num-cpus={num_cpus}",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
            *extra,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while not ready(gcs, dash):
            assert head.poll() is None and time.time() < deadline, "ray head did not start"
            time.sleep(1)
        yield head, gcs, dash
    finally:
        head.terminate()  # README: stop just this head (its `ray start --block` pid)
        try:
            head.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if session_pids(head.pid):
                os.killpg(head.pid, signal.SIGKILL)
                head.wait()
        for pid in processes_mentioning(temp):  # anything of this head that outlived it
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
