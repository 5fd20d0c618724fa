"""Ray Tune sweeps: bad spaces fail before Ray starts; a real tiny sweep, interrupted, resumes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metarec.config import load_config
from metarec.errors import ConfigError
from metarec.tune import parse_space

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("meta.algorithm=choice(maml,mamal)", "meta.algorithm: got 'mamal'"),
        ("meta.inner_lr=loguniform(-0.1,1)", "loguniform needs low > 0"),
        ("meta.outer_lr=uniform(-0.1,0.01)", "meta.outer_lr: got -0.1; expected a float > 0"),
        ("meta.inner_steps=choice()", "choice() is empty"),
        ("meta.inner_lr=loguniform(1,0.1)", "low 1 is not below high 0.1"),
        ("meta.innerlr=choice(0.1)", "unknown config key"),
        ("meta.inner_lr=normal(0,1)", "distribution 'normal'"),
        ("meta.inner_lr", "expected '<config key>=<distribution>(<args>)'"),
    ],
)
def test_bad_search_space_fails_before_any_trial(entry, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_space((entry,), load_config(None))


def test_good_space_parses_typed_values():
    dims = parse_space(
        ("meta.inner_steps=grid(1,3)", "meta.algorithm=choice(maml,fomaml)"), load_config(None)
    )
    assert [(d.key, d.kind, d.values) for d in dims] == [
        ("meta.inner_steps", "grid", (1, 3)),
        ("meta.algorithm", "choice", ("maml", "fomaml")),
    ]


@pytest.mark.integration
def test_cli_rejects_a_bad_space_with_one_line(tmp_path):
    res = subprocess.run(
        [
            *(sys.executable, "-m", "metarec.cli", "tune", "--data", str(tmp_path)),
            *("--space", "meta.algorithm=choice(maml,mamal)"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert "error: " in res.stderr and "Traceback" not in res.stderr


def _finished_trials(work: Path) -> int:
    """Trials whose latest epoch checkpoint says all 3 epochs ran."""
    from metarec.checkpoint import load_checkpoint
    from metarec.errors import DataError

    done = 0
    for trial in (work / "ray_results" / "trials").glob("trial_*"):
        for path in trial.glob("checkpoint_*/checkpoint.pt"):
            try:  # Ray may still be copying it into place
                if load_checkpoint(path)["state"]["epoch"] >= 3:
                    done += 1
                    break
            except (DataError, OSError, RuntimeError):
                continue
    return done


def _tune_cmd(data: Path, work: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "metarec.cli",
        "tune",
        "--data",
        str(data),
        "--work-dir",
        str(work),
        *extra,
    ]


@pytest.mark.integration
def test_tiny_sweep_stops_early_nests_runs_registers_best_and_resumes(
    synthetic_cfg, synthetic_prepared, tmp_path
):
    """4 trials x 3 epochs; a grid of inner lrs where 3.0 and 8.0 diverge, so ASHA (grace 1
    epoch, keep the best half) stops them after the good ones set the bar. The sweep is
    interrupted (SIGINT) after its first trial finishes and resumed with --resume."""
    from mlflow.tracking import MlflowClient

    work = tmp_path / "work"
    space = [  # (a resumed sweep keeps these: --resume refuses them)
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        "--space",
        "meta.inner_lr=grid(0.3,0.5,3.0,8.0)",
        "--num-samples",
        "1",
        "--epochs",
        "3",
        "--max-concurrent",
        "1",
        "--set",
        "tune.grace_period=1",
        "--set",
        "tune.reduction_factor=2",
        "--set",
        "meta.inner_steps=2",
        "--set",
        "meta.inner_solver=gd",  # inner lrs exist only for gradient steps
        "--set",
        "meta.adapt=mlp",
    ]
    env = {**os.environ, "RAY_ADDRESS": "local"}
    first = subprocess.Popen(
        _tune_cmd(synthetic_prepared.root, work, *space),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 600
    while first.poll() is None and time.time() < deadline:  # wait for one finished trial
        if _finished_trials(work) >= 1:  # (not via MLflow: the store may be mid-migration)
            break
        time.sleep(1)
    assert first.poll() is None, "the sweep ended before it could be interrupted"
    first.send_signal(signal.SIGINT)
    out, _ = first.communicate(timeout=300)
    assert "interrupted" in out, out[-3000:]
    sweep = json.loads((work / "last_sweep.json").read_text())["name"]
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("metarec").experiment_id], "tags.`metarec.kind` = 'sweep'"
    )
    assert parent.info.status == "KILLED" and "interrupted" in parent.data.tags["metarec.error"]

    second = subprocess.run(
        _tune_cmd(synthetic_prepared.root, work, "--resume"),
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"sweep:      {sweep} (4 trials)" in second.stdout

    exp = client.get_experiment_by_name("metarec")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("metarec.kind") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 4  # one nested run per trial: none redone as a second run
    statuses = {r.data.tags.get("metarec.trial_status") for r in trials}
    assert "stopped_early" in statuses and "completed" in statuses
    for r in trials:  # no epoch logged twice, even for the trial the interrupt cut short
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "valid/mae")]
        assert steps == sorted(set(steps))
    assert parent.info.status == "FINISHED"  # KILLED by the interrupt, reopened by --resume
    registered = [r for r in trials if "metarec.registered" in r.data.tags]
    assert len(registered) == 1

    def best_mae(run) -> float:
        return min(m.value for m in client.get_metric_history(run.info.run_id, "valid/mae"))

    best = min(trials, key=best_mae)
    assert registered[0].info.run_id == best.info.run_id
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "trials.md", "sweep.png"} <= artifacts
    assert parent.data.tags["metarec.best_trial"]
    # Ray's own summary names the same winner (its metric is the best-so-far valid MAE)
    text = second.stdout + second.stderr
    named = re.findall(r"Current best trial: ([0-9a-f]{5}_\d{5}) with best/valid_mae=", text)
    assert named, text[-3000:]
    assert named[-1] in parent.data.tags["metarec.best_trial"]
    assert "tensorboard" not in text.lower()
