"""Ray Train meta-training, for real: a local Ray cluster, a real `mlflow server`, a worker killed.

One local Ray instance (2 CPUs) for the module. The same small synthetic dataset is trained
with 1 and 2 workers (against the embedded SQLite store and a live MLflow server), and once
more while a worker process is SIGKILLed mid-run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from metarec.checkpoint import load_checkpoint
from metarec.config import apply_overrides
from metarec.errors import ModelNotFoundError
from metarec.loop import TrainState
from tests.ci import require_module
from tests.processes import free_port, stop_group

ray = require_module("ray")
mlflow = require_module("mlflow")
pytestmark = pytest.mark.integration  # a local Ray cluster and a live MLflow server


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def quick(synthetic_cfg):
    return apply_overrides(synthetic_cfg, **{"train.epochs": 3, "meta.inner_steps": 2})


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (random free port); stopped by its pid."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'srv.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=root,
        stdout=(root / "server.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: we stop exactly what we started
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        stop_group(proc, timeout=30)


@pytest.fixture(scope="module")
def runs(local_ray, quick, synthetic_prepared, tmp_path_factory, mlflow_server):
    from metarec.train import train

    exact = apply_overrides(quick, **{"train.dtype": "float64"})
    one = train(exact, synthetic_prepared.root, workers=1, work_dir=tmp_path_factory.mktemp("w1"))
    two = train(
        exact,
        synthetic_prepared.root,
        workers=2,
        work_dir=tmp_path_factory.mktemp("w2"),
        tracking_uri=mlflow_server,
    )
    return one, two


def _history(outcome) -> list[dict[str, float]]:
    return TrainState.from_dict(load_checkpoint(outcome.checkpoint)["state"]).history


def test_two_workers_follow_the_one_worker_trajectory(runs):
    one, two = runs
    h1, h2 = _history(one), _history(two)
    assert [r["epoch"] for r in h1] == [r["epoch"] for r in h2] == [0, 1, 2]
    # Same meta-batches, gradients summed across workers: only the summation order and
    # each worker's padding width differ. In float64 that is ~1e-16 per step; Adam's first
    # steps (update ~ lr * sign(g)) amplify rounding in near-zero gradient entries, which in
    # float32 already moves valid MAE by ~2e-3 after 3 epochs (measured with threads in
    # tests/test_data_parallel.py), so the runs are compared in float64, at 1e-7.
    for a, b in zip(h1, h2, strict=True):
        assert b["train/query_loss"] == pytest.approx(a["train/query_loss"], rel=1e-7)
        assert b["valid/mae"] == pytest.approx(a["valid/mae"], rel=1e-7)


def test_run_is_tracked_on_a_real_mlflow_server(runs, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from metarec.tracking import describe_model, promote, resolve_checkpoint

    _, two = runs
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    run = client.get_run(two.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["meta.algorithm"] == "metasgd"
    assert run.data.params["train.dtype"] == "float64"
    assert run.data.params["dataset.hash"] == run.data.tags["metarec.dataset_hash"]
    steps = [m.step for m in client.get_metric_history(two.run_id, "valid/mae")]
    assert steps == [0, 1, 2]
    assert {"train/query_loss", "train/tasks_per_s", "wall_s", "best/valid_mae"} <= set(
        run.data.metrics
    )
    artifacts = {a.path for a in client.list_artifacts(two.run_id)}
    assert {"learning_curve.png", "checkpoint"} <= artifacts
    name = two.model_uri.split("/")[1].split("@")[0]
    version = client.get_model_version_by_alias(name, "candidate")
    assert version.run_id == two.run_id
    ckpt = load_checkpoint(resolve_checkpoint(two.model_uri, mlflow_server))
    assert ckpt["state"]["best_epoch"] == two.best_epoch
    promote(mlflow_server, name, version.version)
    assert client.get_model_version_by_alias(name, "champion").version == version.version
    # What `metarec serve` reports at GET /v1/model, and what it loads: a catalog inside.
    info = describe_model(f"models:/{name}@champion", mlflow_server)
    assert (info["name"], info["version"], info["alias"]) == (name, version.version, "champion")
    assert info["run_id"] == two.run_id
    assert len(ckpt["catalog"]["raw_id"]) == ckpt["spec"]["n_items"]
    with pytest.raises(ModelNotFoundError):
        describe_model(f"models:/{name}@no-such-alias", mlflow_server)


def test_resume_continues_a_stopped_run_into_the_same_mlflow_run(
    runs, local_ray, quick, synthetic_prepared
):
    from mlflow.tracking import MlflowClient

    from metarec.train import train

    one, _ = runs
    work = one.checkpoint.parents[2]
    before = _history(one)  # (the resumed run rewrites this checkpoint)
    more = apply_overrides(quick, **{"train.epochs": 5})
    out = train(more, synthetic_prepared.root, workers=1, work_dir=work, resume=one.run_name)
    assert (out.run_name, out.run_id) == (one.run_name, one.run_id)
    history = _history(out)
    assert [r["epoch"] for r in history] == [0, 1, 2, 3, 4]
    assert history[:3] == before  # the first three epochs are the stopped run's
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(out.run_id, "valid/mae")]
    assert steps == [0, 1, 2, 3, 4]


def test_resume_refuses_a_checkpoint_of_another_dataset(runs, local_ray, quick, tmp_path):
    from metarec.data.prepare import prepare
    from metarec.errors import DataError
    from metarec.train import train

    one, _ = runs
    other = prepare(apply_overrides(quick, seed=7), tmp_path / "other", progress=False)
    work = one.checkpoint.parents[2]
    with pytest.raises(DataError, match="trained on prepared dataset"):
        train(quick, other.root, workers=1, work_dir=work, resume=one.run_name)


def _descendants(pid: int) -> dict[int, str]:
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


def _train_workers() -> set[int]:
    return {p for p, cmd in _descendants(os.getpid()).items() if "RayTrainWorker" in cmd}


def test_killed_worker_resumes_from_last_checkpoint(local_ray, quick, synthetic_prepared, tmp_path):
    from mlflow.tracking import MlflowClient

    from metarec.train import train

    cfg = apply_overrides(quick, **{"train.epochs": 6})
    outcome: dict = {}
    thread = threading.Thread(
        target=lambda: outcome.update(
            out=train(cfg, synthetic_prepared.root, workers=2, work_dir=tmp_path)
        ),
        daemon=True,
    )
    thread.start()
    deadline = time.time() + 300
    while not list((tmp_path / "ray_results").glob("*/checkpoint_*")):  # epoch 0 is saved
        assert thread.is_alive() and time.time() < deadline, "training ended before epoch 0"
        time.sleep(0.2)
    before = _train_workers()
    assert before, "no Ray Train worker process found"
    os.kill(max(before), signal.SIGKILL)
    restarted = False
    while thread.is_alive() and not restarted:  # a new worker group replaces the dead one
        restarted = bool(_train_workers() - before)
        time.sleep(0.2)
    thread.join(timeout=600)
    assert restarted, "no new worker process appeared after the kill"
    assert "out" in outcome, "training did not finish after the worker was killed"
    out = outcome["out"]
    history = TrainState.from_dict(load_checkpoint(out.checkpoint)["state"]).history
    assert [r["epoch"] for r in history] == list(range(6))  # none lost, none repeated
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    steps = sorted(m.step for m in client.get_metric_history(out.run_id, "valid/mae"))
    assert steps == list(range(6))
    assert list((tmp_path / "mlartifacts").rglob("checkpoint.pt"))  # beside the store
