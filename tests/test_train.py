"""Ray Train meta-training, for real: a local Ray cluster, a real `mlflow server`, a worker killed.

One local Ray instance (2 CPUs) for the module. A small synthetic dataset with an uneven
task count (481) is trained with 1 and 2 workers (against the embedded SQLite store and a
live MLflow server), resumed on another worker count, trained once more while a worker
process is SIGKILLed mid-run, and once with a manifest that promises a task the data lacks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from metarec.checkpoint import CHECKPOINT_VERSION, load_checkpoint, save_checkpoint
from metarec.config import apply_overrides
from metarec.errors import ConfigError, ModelNotFoundError
from metarec.train_state import TrainState
from tests.ci import require_module
from tests.processes import free_port, stop_group, train_workers

ray = require_module("ray")
mlflow = require_module("mlflow")
pytestmark = pytest.mark.integration  # a local Ray cluster and a live MLflow server


@pytest.fixture(scope="module")
def local_ray():
    from metarec.ray_cluster import local_ray_settings

    local_ray_settings(os.environ)  # as `metarec train` starts its own Ray
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


TASKS = 481  # uneven_prepared's training tasks: 241 + 240 on two workers


@pytest.fixture(scope="module")
def runs(local_ray, quick, uneven_prepared, tmp_path_factory, mlflow_server):
    from metarec.train import train

    exact = apply_overrides(quick, **{"train.dtype": "float64"})
    one = train(exact, uneven_prepared.root, workers=1, work_dir=tmp_path_factory.mktemp("w1"))
    two = train(
        exact,
        uneven_prepared.root,
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
    # Every task once per epoch (each worker checked it, or the run would have failed).
    assert [r["train/tasks"] for r in h2] == [TASKS] * 3
    # the largest worker's memory, once it held its data and so far (never falling)
    peaks = [r["train/worker_peak_mb"] for r in h2]
    assert 50 < h2[0]["train/worker_read_peak_mb"] <= peaks[0] and peaks == sorted(peaks)


def test_run_is_tracked_on_a_real_mlflow_server(runs, quick, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from metarec.registry import describe_model, promote, resolve_checkpoint

    _, two = runs
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    run = client.get_run(two.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["meta.algorithm"] == quick.meta.algorithm
    assert run.data.params["meta.inner_solver"] == quick.meta.inner_solver
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


def test_resume_trains_further_on_another_worker_count_into_the_same_mlflow_run(
    runs, local_ray, uneven_prepared, monkeypatch
):
    from mlflow.tracking import MlflowClient

    import metarec.train
    from metarec.train import resume

    def refit(*_, **__):
        raise AssertionError("a resumed run refitted its initial checkpoint")

    # the workers start from the checkpoint's network: no ALS or graph refit on the driver
    monkeypatch.setattr(metarec.train, "initial_checkpoint", refit)
    one, _ = runs
    work = one.checkpoint.parents[2]
    before = _history(one)  # (the resumed run rewrites this checkpoint)
    out = resume(one.run_name, uneven_prepared.root, epochs=5, workers=2, work_dir=work)
    assert (out.run_name, out.run_id) == (one.run_name, one.run_id)
    ckpt = load_checkpoint(out.checkpoint)
    assert ckpt["config"]["train"]["workers"] == 2  # --workers honoured
    assert ckpt["config"]["train"]["dtype"] == "float64"  # the rest is the run's own
    history = TrainState.from_dict(ckpt["state"]).history
    assert [r["epoch"] for r in history] == [0, 1, 2, 3, 4]
    assert history[:3] == before  # the first three epochs are the stopped run's
    assert [r["train/tasks"] for r in history] == [TASKS] * 5
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    assert client.get_run(out.run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(out.run_id, "valid/mae")]
    assert steps == [0, 1, 2, 3, 4]


def test_resume_refuses_a_checkpoint_of_another_dataset(runs, local_ray, quick, tmp_path):
    from metarec.data.prepare import prepare
    from metarec.errors import DataError
    from metarec.train import resume

    one, _ = runs
    other = prepare(apply_overrides(quick, seed=7), tmp_path / "other", progress=False)
    work = one.checkpoint.parents[2]
    with pytest.raises(DataError, match="trained on prepared dataset"):
        resume(one.run_name, other.root, epochs=9, work_dir=work)


def _ckpt(quick, epoch: int, **state) -> dict:
    return {
        "schema_version": CHECKPOINT_VERSION,
        "config": quick.to_dict(),
        "state": TrainState(epoch=epoch, **state).to_dict(),
    }


def test_resume_keeps_the_epochs_unless_asked_and_honours_resources(quick):
    from metarec.train import resumed_config

    stopped = _ckpt(quick, 1)  # interrupted after 1 of quick's 3 epochs
    assert resumed_config(stopped, run_name="r").train == quick.train  # 3, not a default
    cfg = resumed_config(
        stopped, run_name="r", epochs=7, workers=3, use_gpu=False, cpus_per_worker=0.5
    )
    assert (cfg.train.epochs, cfg.train.workers, cfg.train.use_gpu) == (7, 3, False)
    assert cfg.train.cpus_per_worker == 0.5 and cfg.meta == quick.meta
    with pytest.raises(ConfigError, match="--epochs: got 1; expected more than the 1 epochs"):
        resumed_config(stopped, run_name="r", epochs=1)
    with pytest.raises(ConfigError, match="has done all its 3 epochs.*Pass --epochs N"):
        resumed_config(_ckpt(quick, 3), run_name="r")
    with pytest.raises(ConfigError, match="early stopping ended after 2 epochs"):
        resumed_config(_ckpt(quick, 2, stopped=True), run_name="r", epochs=9)


def test_checkpoints_are_ordered_by_epoch_not_mtime(quick, tmp_path):
    from metarec.train import run_checkpoints

    epochs = {"checkpoint_2026-11-23_10-19-26.1": 2, "checkpoint_2026-11-23_10-19-27.0": 10}
    epochs |= {"checkpoint_2026-11-23_10-19-25.9": 3}  # names not in epoch order either
    for i, (name, epoch) in enumerate(epochs.items()):
        path = save_checkpoint(_ckpt(quick, epoch), tmp_path / name)
        os.utime(path, (1e9 - 1000 * epoch, 1e9 - 1000 * epoch))  # newest epoch oldest
        os.utime(path.parent, (1e9 + i, 1e9 + i))
    found = run_checkpoints(tmp_path)
    assert [epochs[p.parent.name] for p in found] == [2, 3, 10]


def _train_workers() -> set[int]:
    return train_workers(under=os.getpid())


def test_killed_worker_resumes_from_last_checkpoint_and_still_sees_every_task(
    local_ray, quick, uneven_prepared, tmp_path
):
    from mlflow.tracking import MlflowClient

    from metarec.train import train

    cfg = apply_overrides(quick, **{"train.epochs": 6})
    outcome: dict = {}
    thread = threading.Thread(
        target=lambda: outcome.update(
            out=train(cfg, uneven_prepared.root, workers=2, work_dir=tmp_path)
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
    assert [r["train/tasks"] for r in history] == [TASKS] * 6  # before and after the restart
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    steps = sorted(m.step for m in client.get_metric_history(out.run_id, "valid/mae"))
    assert steps == list(range(6))
    assert list((tmp_path / "mlartifacts").rglob("checkpoint.pt"))  # beside the store


def test_a_run_that_fails_inside_fit_is_failed_in_mlflow(
    local_ray, quick, uneven_prepared, tmp_path
):
    """A manifest that promises one task more than the data holds: as if the split had lost
    one. Every worker stops before training; the run is FAILED, with the reason."""
    from mlflow.tracking import MlflowClient

    from metarec.train import train

    data = tmp_path / "data"
    shutil.copytree(uneven_prepared.root, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["scenarios"]["user_cold"]["train"]["tasks"] = TASKS + 1
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="expected all 482 training tasks"):
        train(quick, data, workers=2, work_dir=tmp_path / "work", max_failures=0)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("metarec").experiment_id])
    assert run.info.status == "FAILED"
    assert "hold 481 tasks; expected all 482 training tasks" in run.data.tags["metarec.error"]


def _train_cli(data: Path, work: Path, epochs: int) -> subprocess.CompletedProcess:
    """`metarec train` as a user runs it, 2 workers on its own local Ray; must succeed."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(
        [
            *(sys.executable, "-m", "metarec.cli", "train", "--data", str(data)),
            *("--epochs", str(epochs), "--workers", "2", "--work-dir", str(work)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        start_new_session=True,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_train_prints_one_line_per_epoch_and_keeps_ray_logs_out(uneven_prepared, tmp_path):
    out = _train_cli(uneven_prepared.root, tmp_path, epochs=3)
    lines = out.stdout.splitlines()
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [e.split()[1] for e in epochs] == ["1/3", "2/3", "3/3"], out.stdout
    assert all("valid MAE" in e and "tasks/s" in e for e in epochs)
    assert len(lines) <= len(epochs) + 10, out.stdout  # epochs, the log path and a summary
    assert any(line.startswith("Ray's worker logs: ") for line in lines)
    both = out.stdout + out.stderr
    ray_noise = ("Reporting training result", "PreemptionWatcher", "Traceback")
    mlflow_noise = ("CloudPickle", "infer model signature", "Downloading artifacts")
    mlflow_noise += ("Successfully registered model", "Created version")
    ray_noise += ("Token authentication is enabled", "PYTHON worker processes")
    for noise in (*ray_noise, *mlflow_noise):
        assert noise not in both, (noise, both[-3000:])


def test_train_on_implicit_data_tracks_its_ranking_objective(shop_prepared, tmp_path):
    """`metarec train` on events: Ray Train workers, BPR/BCE against sampled negatives,
    early stopping and MLflow on 1 - NDCG@10 of the full catalogue."""
    from mlflow.tracking import MlflowClient

    out = _train_cli(shop_prepared.root, tmp_path, epochs=2)
    epochs = [line for line in out.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2 and all("valid 1-NDCG@10" in e for e in epochs), out.stdout
    assert "valid 1-NDCG@10:" in out.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("metarec").experiment_id])
    history = client.get_metric_history(run.info.run_id, "valid/1-ndcg_at_10")
    assert [m.step for m in history] == [0, 1] and all(0 < m.value < 1 for m in history)
    assert "best/valid_1-ndcg_at_10" in run.data.metrics
