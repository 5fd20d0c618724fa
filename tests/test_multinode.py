"""A two-node Ray cluster on this machine: a node dies mid-epoch and training goes on.

A real `ray start --head` (1 CPU) and a second node joined to it (``tests.ray_worker_node``,
1 CPU: `ray start --address` on 127.0.0.1), every port on loopback. `metarec train` runs
against the cluster as a user's driver would (``RAY_ADDRESS``), one worker per node
(``--placement STRICT_SPREAD``). Once the first epoch is checkpointed, the second node's
raylet is SIGKILLed: the node and the worker on it are gone. A replacement node joins (what
an autoscaler does), Ray Train restarts the group from the last checkpoint, and the run
ends with every epoch once and every training task in every epoch.

The raylet's own worker processes outlive it (Ray 2.60: a core worker does not exit when
its raylet dies); the run still restarts once the GCS declares the node dead, and the
orphan is killed at the end like the rest of the node.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metarec.checkpoint import load_checkpoint
from metarec.ray_cluster import local_ray_settings
from metarec.train import run_checkpoints
from metarec.train_state import TrainState
from tests.ci import require_module
from tests.processes import (
    is_loopback,
    listening_sockets,
    started_ray_head,
    stop_group,
    train_workers,
)

ray = require_module("ray")
# slow (`pytest -m slow`, as tests/test_jobs.py): two nodes and a restart take about two
# minutes, more than `make test`'s budget has left
pytestmark = [pytest.mark.integration, pytest.mark.slow]

RAY = Path(sys.executable).parent / "ray"
TASKS = 481  # uneven_prepared's training tasks
EPOCHS = 20
# A node that misses 3 health checks 0.5 s apart is dead (Ray's default takes 15 s or more).
HEALTH = json.dumps(
    {
        "health_check_period_ms": 500,
        "health_check_timeout_ms": 500,
        "health_check_failure_threshold": 3,
    }
)


class Node:
    """One worker node (``tests.ray_worker_node``), its own process group; stopped by pid."""

    def __init__(self, env: dict[str, str], gcs: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.ray_worker_node", f"--address=127.0.0.1:{gcs}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        line = self.proc.stdout.readline()  # once the node has registered with the GCS
        assert line, "the worker node did not start"
        self.raylet = json.loads(line)["raylet_pid"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            stop_group(self.proc, timeout=60)


def _nodes_alive(env: dict[str, str], gcs: int) -> int:
    out = subprocess.run(
        [str(RAY), "status", "--address", f"127.0.0.1:{gcs}"], env=env, capture_output=True
    )
    text = out.stdout.decode()
    if out.returncode or "Active:" not in text:  # not up yet
        return 0
    return text.split("Active:")[1].split("Pending:")[0].count("node_")


@pytest.fixture
def cluster():
    """The head and one worker node (1 CPU each); yields (env, gcs port, nodes list)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env["RAY_AUTH_MODE"] = "disabled"  # tests/test_jobs.py covers token auth
    local_ray_settings(env)
    up = lambda gcs, _: _nodes_alive(env, gcs) == 1  # noqa: E731
    extra = (f"--system-config={HEALTH}",)
    with started_ray_head(env, up, num_cpus=1, extra=extra, grace=5) as (head, gcs, _):
        nodes = [Node(env, gcs)]
        try:
            yield env, gcs, nodes, head
        finally:
            for node in nodes:
                node.stop()


def test_a_killed_node_is_replaced_and_training_resumes_with_every_task(
    cluster, uneven_prepared, tmp_path
):
    env, gcs, nodes, head = cluster
    for pid in (head.pid, nodes[0].proc.pid):
        assert all(is_loopback(addr) for _, addr, _ in listening_sockets(pid))
    work = tmp_path / "work"
    driver = subprocess.Popen(
        [
            *(sys.executable, "-m", "metarec.cli", "train", "--data", str(uneven_prepared.root)),
            *("--epochs", str(EPOCHS), "--workers", "2", "--placement", "STRICT_SPREAD"),
            *("--work-dir", str(work)),
        ],
        env={**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"},
        stdout=(tmp_path / "driver.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    doomed: set[int] = set()
    try:
        deadline = time.time() + 300
        while not list(work.glob("ray_results/*/checkpoint_*")):  # epoch 0 is saved
            assert driver.poll() is None and time.time() < deadline, _log(tmp_path)
            time.sleep(0.2)
        doomed = train_workers(under=nodes[0].raylet)
        assert doomed, "no Train worker on the second node"
        os.kill(nodes[0].raylet, signal.SIGKILL)  # the node fails, with its worker
        nodes.append(Node(env, gcs))  # its replacement joins
        replaced = False
        while driver.poll() is None and time.time() < deadline + 300:
            replaced = replaced or bool(train_workers(under=nodes[1].raylet))
            time.sleep(0.2)
        assert driver.wait(timeout=5) == 0, _log(tmp_path)
    finally:
        if driver.poll() is None:
            stop_group(driver, timeout=30)
        for pid in doomed:  # orphans of the dead raylet
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
    assert replaced, "no Train worker ran on the replacement node"
    (run_dir,) = work.glob("ray_results/*/")
    history = TrainState.from_dict(load_checkpoint(run_checkpoints(run_dir)[-1])["state"]).history
    assert [r["epoch"] for r in history] == list(range(EPOCHS))  # none lost, none repeated
    assert [r["train/tasks"] for r in history] == [TASKS] * EPOCHS


def _log(tmp_path: Path) -> str:
    return (tmp_path / "driver.log").read_text()[-4000:]
