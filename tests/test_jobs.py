"""`ray job submit` of jobs/train.py to a real `ray start` head (loopback, token auth on)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.processes import free_port, stop_group

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.fixture
def ray_head():
    """A `ray start --head --block` on 127.0.0.1 with its own temp dir; stopped by pid.

    (`ray stop` would end every Ray process on the machine, not just this head.)
    """
    temp = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray's socket paths have a limit
    dash = free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",  # be explicit: token auth on for the head and its clients
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
    }
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [
            str(RAY),
            "start",
            "--head",
            "--block",
            f"--port={free_port()}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--num-cpus=2",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while subprocess.run(
            [str(RAY), "job", "list", "--address", address], env=env, capture_output=True
        ).returncode:
            assert head.poll() is None and time.time() < deadline, "ray head did not start"
            time.sleep(1)
        yield address, env
    finally:
        stop_group(head, timeout=60)
        for pid in _processes_mentioning(temp):  # anything of this head that outlived it
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_train_job_runs_on_a_ray_start_head(ray_head, synthetic_prepared, tmp_path):
    from mlflow.tracking import MlflowClient

    address, env = ray_head
    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    refused = subprocess.run(
        [str(RAY), "job", "list", "--address", address], env=no_token, capture_output=True
    )
    assert refused.returncode != 0  # authentication stays on
    work = tmp_path / "work"
    submit = subprocess.run(
        [
            str(RAY),
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            str(REPO),
            "--",
            sys.executable,  # the cluster's Python: here, this venv's
            "jobs/train.py",
            "--config",
            "configs/demo.yaml",
            "--data",
            str(synthetic_prepared.root),
            "--epochs",
            "2",
            "--workers",
            "2",
            "--work-dir",
            str(work),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in (submit.stdout + submit.stderr).lower()
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("metarec").experiment_id])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "valid/mae")]
    assert steps == [0, 1]
