"""README "Run on a cluster", against a real `ray start` head (loopback, token auth on).

The job commands are the README's, run from the repository root with `--working-dir .`:
prepare, train, evaluate, tune and promote, each a `ray job submit`. As cluster.yaml does on
the cluster, the head is started with MLFLOW_TRACKING_URI and the venv on its PATH, and the
client has neither: the test checks that jobs inherit both from the head (runs land in the
head's store, not in the default one under --work-dir; `python` is the venv's).
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from metarec.ray_cluster import local_ray_settings
from tests.processes import (
    free_port,
    is_loopback,
    listening_sockets,
    session_pids,
    started_ray_head,
)

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"


@pytest.fixture
def ray_head(tmp_path):
    """A `ray start --head --block` on 127.0.0.1 with its own temp dir; stopped by pid.

    (`ray stop` would end every Ray process on the machine, not just this head.) Yields the
    dashboard address, the client's environment, the head's MLflow tracking URI, its
    `ray start` process and its GCS port.
    """
    client = {
        **os.environ,
        "RAY_AUTH_MODE": "token",  # be explicit: token auth on for the head and its clients
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
    }
    for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        client.pop(var, None)
    tracking_uri = f"sqlite:///{tmp_path / 'head-mlflow' / 'mlflow.db'}"
    (tmp_path / "head-mlflow").mkdir()
    local_ray_settings(client)  # README: every port of the head on 127.0.0.1
    head_env = {
        **client,
        "MLFLOW_TRACKING_URI": tracking_uri,  # what cluster.yaml's ~/metarec.env does
        "PATH": f"{VENV_BIN}{os.pathsep}{client.get('PATH', '')}",  # a job's `python`
    }

    def answers(gcs: int, dash: int) -> bool:
        job_list = [str(RAY), "job", "list", "--address", f"http://127.0.0.1:{dash}"]
        return subprocess.run(job_list, env=client, capture_output=True).returncode == 0

    with started_ray_head(head_env, answers) as (head, gcs, dash):
        yield f"http://127.0.0.1:{dash}", client, tracking_uri, head, gcs


def _submit(env: dict[str, str], entrypoint: str) -> str:
    """`ray job submit --working-dir . -- ENTRYPOINT` from the repository root, as in README.

    Right after `ray start`, the dashboard may answer before its agent is up; that refusal
    ("No available agent to submit job, please try again later") is retried; on two loaded
    cores the agent has once taken over two minutes to come up.
    """
    deadline = time.time() + 300
    while True:
        res = subprocess.run(
            [str(RAY), "job", "submit", "--working-dir", ".", "--", *shlex.split(entrypoint)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        out = res.stdout + res.stderr
        if "No available agent" not in out or time.time() > deadline:
            break
        time.sleep(2)
    assert res.returncode == 0, f"{entrypoint}\n{out[-4000:]}"
    assert "succeeded" in out.lower(), out[-4000:]
    return out


@pytest.mark.integration
def test_a_local_head_listens_on_loopback_only_and_stops_alone(ray_head):
    address, env, _, head, gcs = ray_head
    deadline = time.time() + 60
    while not any(n.startswith("ray::Dashboard") for n, *_ in listening_sockets(head.pid)):
        assert time.time() < deadline, listening_sockets(head.pid)  # its agent: the last up
        time.sleep(1)
    listening = listening_sockets(head.pid)
    ports = {port for _, _, port in listening}
    assert {gcs, int(address.rsplit(":", 1)[1])} <= ports, listening  # GCS, the job API
    assert "raylet" in {name for name, *_ in listening}, listening
    exposed = [s for s in listening if not is_loopback(s[1])]
    assert not exposed, f"listening beyond 127.0.0.1: {exposed}"
    deadline = time.time() + 60
    while True:  # README: `ray status` takes the GCS address, no scheme
        status = subprocess.run(
            [str(RAY), "status", "--address", f"127.0.0.1:{gcs}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if "Active:" in status.stdout or time.time() > deadline:  # else: autoscaler not up
            break
        time.sleep(2)
    assert status.returncode == 0 and "Active:" in status.stdout, status.stdout + status.stderr
    head.terminate()  # README's stop: SIGTERM to this head's pid ends all of it, nothing else
    head.wait(timeout=60)
    deadline = time.time() + 60
    while session_pids(head.pid) and time.time() < deadline:
        time.sleep(1)
    assert not session_pids(head.pid)


@pytest.mark.slow
def test_readme_cluster_jobs_run_on_a_ray_start_head(ray_head, tmp_path):
    from mlflow.tracking import MlflowClient

    address, env, tracking_uri, _, _ = ray_head
    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    refused = subprocess.run(
        [str(RAY), "job", "list", "--address", address], env=no_token, capture_output=True
    )
    assert refused.returncode != 0  # authentication stays on
    env = {**env, "RAY_ADDRESS": address}
    work = tmp_path / "work"  # README: WORK=$PWD/work here (/mnt/shared/work on AWS)
    gpu = "--set train.use_gpu=false"  # README: GPU=... (true on AWS)
    small = "--set data.synthetic.n_users=600 --set data.synthetic.n_items=300"

    _submit(
        env, f"python jobs/prepare.py --config configs/demo.yaml {small} --out {work}/demo-data"
    )
    _submit(
        env,
        f"python jobs/train.py --config configs/demo.yaml --data {work}/demo-data "
        f"--work-dir {work} {gpu} --epochs 2",
    )
    last_run = json.loads((work / "last_run.json").read_text())
    model, name = last_run["model_uri"], last_run["model_uri"].split("/")[1].split("@")[0]
    # Cheaper than README's: one baseline instead of all, one 1-epoch trial instead of 16.
    _submit(
        env,
        f"python jobs/evaluate.py --data {work}/demo-data --work-dir {work} --out {work}/eval "
        f"--model {model} --baselines bias",
    )
    _submit(
        env,
        f"python jobs/tune.py --config configs/demo.yaml --data {work}/demo-data "
        f"--work-dir {work} {gpu} --num-samples 1 --epochs 1",
    )
    _submit(env, f"metarec promote {name} 1 --work-dir {work}")

    assert not (work / "mlflow.db").exists()  # the head's MLFLOW_TRACKING_URI won
    assert json.loads((work / "eval" / "results.json").read_text())
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("metarec").experiment_id])
    (train_run,) = [r for r in runs if r.info.run_id == last_run["run_id"]]
    assert train_run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(train_run.info.run_id, "valid/mae")]
    assert steps == [0, 1]
    sweeps = [r for r in runs if r.data.tags.get("metarec.kind") == "sweep"]
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"

    # README: `serve deploy serve/config.yaml` onto the same head serves the champion.
    cfg = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    port = free_port()
    cfg["http_options"]["port"] = port
    cfg["applications"][0]["args"]["work_dir"] = str(work)  # model: null = the champion
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
    serve_cli = str(VENV_BIN / "serve")
    deployed = subprocess.run(
        [serve_cli, "deploy", str(tmp_path / "serve.yaml"), "--address", address],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    try:
        deadline = time.time() + 180
        while True:
            try:
                model_info = requests.get(f"http://127.0.0.1:{port}/v1/model", timeout=5)
                if model_info.status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.time() < deadline, "serve deploy: the app never answered"
            time.sleep(2)
        info = model_info.json()
        assert (info["name"], info["version"], info["alias"]) == (name, "1", "champion")
        answer = requests.post(f"http://127.0.0.1:{port}/v1/recommend", json={"k": 3}, timeout=30)
        assert answer.status_code == 200 and len(answer.json()["items"]) == 3
    finally:
        subprocess.run([serve_cli, "shutdown", "--address", address, "-y"], env=env, timeout=120)
