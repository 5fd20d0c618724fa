"""Experiment tracking in MLflow: the only module that imports mlflow.

Embedded default: a SQLite store under the work directory (no server); ``MLFLOW_TRACKING_URI``
or ``--tracking-uri`` point at a real server. Runs are addressed by id through
``MlflowClient`` (no global "active run"), so the driver and rank 0 of a Ray Train worker
group write to the same run without sharing process state.

A trained model is logged as an MLflow pyfunc whose artifact is the metarec checkpoint
(read with ``weights_only=True``), registered under a name per dataset with the alias
``candidate``; ``promote`` moves ``champion``. ``resolve_checkpoint`` turns
``models:/<name>@<alias>``, ``runs:/<id>/model`` or a local path into that checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from metarec.checkpoint import FILENAME
from metarec.errors import ModelNotFoundError
from metarec.pyfunc import MetarecPyfunc
from metarec.results import pipe_table

__all__ = [
    "EXPERIMENT",
    "EpochLogger",
    "Terminated",
    "client_for",
    "ends_honestly",
    "find_run",
    "finish_run",
    "log_evaluation",
    "reopen_run",
    "resolve_tracking_uri",
    "set_trial_status",
    "start_run",
    "using_uri",
]

EXPERIMENT = "metarec"
CANDIDATE, CHAMPION = "candidate", "champion"
ERROR_TAG = "metarec.error"
log = logging.getLogger(__name__)


def resolve_tracking_uri(explicit: str | None, work_dir: str | os.PathLike) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<work>/mlflow.db``.

    (MLflow 3's file store refuses new runs, so the embedded default is SQLite.)
    """
    if explicit:
        return explicit
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    path = Path(work_dir).resolve() / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def client_for(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def using_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at ``uri`` for a block, then put back what was there.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI`` to the environment; left
    set, one run's server would silently receive the next run's metrics in this process.
    """
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


def _flat(prefix: str, value: Any) -> Iterable[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _flat(f"{prefix}.{k}" if prefix else k, v)
    else:
        yield prefix, value


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def start_run(
    uri: str,
    *,
    run_name: str,
    config: dict[str, Any],
    manifest: dict[str, Any],
    tags: dict[str, str] | None = None,
) -> str:
    """Create the run of one training: every config key, the dataset summary, the commit."""
    client = client_for(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT, _artifacts(uri))
    all_tags = {
        "metarec.run_name": run_name,
        "metarec.algorithm": config["meta"]["algorithm"],
        "metarec.dataset_hash": manifest["dataset_hash"],
        "metarec.source": str(manifest.get("source", {}).get("name", "")),
        **(tags or {}),
    }
    if commit := _git_commit():
        all_tags["mlflow.source.git.commit"] = commit
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    params = dict(_flat("", config))
    params |= {f"dataset.{k}": v for k, v in _flat("", manifest.get("counts", {}))}
    params["dataset.hash"] = manifest["dataset_hash"]
    batch = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()]
    for lo in range(0, len(batch), 100):  # the REST API takes at most 100 params a call
        client.log_batch(run.info.run_id, params=batch[lo : lo + 100])
    return run.info.run_id


def _artifacts(uri: str) -> str | None:
    """Artifacts of a SQLite store live beside it (MLflow's default, ./mlruns under the
    current directory, would scatter them, and inside a Ray job vanish with its working dir).
    A server decides for itself."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()


def find_run(uri: str, run_name: str) -> str:
    """The id of the run named ``run_name`` (``metarec train --resume``)."""
    run_id = find_run_by_tag(uri, "metarec.run_name", run_name)
    if run_id is None:
        raise ModelNotFoundError(f"--resume {run_name}: no such run in {uri}")
    return run_id


def find_run_by_tag(uri: str, tag: str, value: str) -> str | None:
    client = client_for(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{tag}` = '{value}'")
    return runs[0].info.run_id if runs else None


class Terminated(SystemExit):
    """SIGTERM, raised where the main thread is, so ``finally`` blocks run; the process
    then exits 128 + 15 as if the signal had killed it, without a traceback."""


@contextlib.contextmanager
def ends_honestly(
    uri: str, run_id: str, *, killed: tuple[type[BaseException], ...] = ()
) -> Iterator[None]:
    """End the run FAILED if the block raises, KILLED if it is interrupted (Ctrl-C,
    SIGTERM, ``sys.exit``, or one of ``killed``), recording why in the tag
    ``metarec.error`` and the run's note; then re-raise.

    Without this, a run that dies after ``start_run`` stays RUNNING forever. For the block's
    duration SIGTERM raises ``Terminated`` (only the main thread can set handlers, and
    receives the signal); the previous handler comes back afterwards. A signal that lands
    inside a blocking ``ray.get`` surfaces as Ray's ``SystemExit(1)`` instead, so the
    handler also notes that it fired, and ``Terminated`` is raised in its place.
    """
    received: list[int] = []

    def on_sigterm(signum: int, frame: Any) -> None:
        received.append(signum)
        raise Terminated(128 + signum)

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    except (KeyboardInterrupt, SystemExit, *killed) as e:
        _end_run(uri, run_id, "KILLED", _interruption(e, received))
        if received and not isinstance(e, Terminated):
            raise Terminated(128 + received[0]) from e
        raise
    except BaseException as e:
        _end_run(uri, run_id, "FAILED", f"{type(e).__name__}: {e}")
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interruption(e: BaseException, signals: list[int]) -> str:
    if signals:
        return f"interrupted: {signal.Signals(signals[0]).name}"
    if isinstance(e, KeyboardInterrupt):
        return "interrupted: Ctrl-C"
    if isinstance(e, SystemExit):
        return f"interrupted: exit {e.code}"
    return f"{type(e).__name__}: {e}"


def _end_run(uri: str, run_id: str, status: str, why: str) -> None:
    """Best effort: the error being raised matters more than a tracking server that is
    down, so a failure to record it is logged, not raised over it."""
    why = why.strip()[:5000]  # MLflow's tag value limit is 8000 characters
    try:
        client = client_for(uri)
        client.set_tag(run_id, ERROR_TAG, why)
        client.set_tag(run_id, "mlflow.note.content", f"{status}: {why}")
        client.set_terminated(run_id, status)
    except (mlflow.exceptions.MlflowException, OSError) as e:
        log.warning("could not mark MLflow run %s %s (%s): %s", run_id, status, why[:200], e)


def reopen_run(uri: str, run_id: str) -> None:
    """Mark a resumed run RUNNING again and drop the error of the attempt it continues."""
    client = client_for(uri)
    tags = client.get_run(run_id).data.tags
    for tag in (ERROR_TAG, "mlflow.note.content"):
        if tag in tags:
            client.delete_tag(run_id, tag)
    client.update_run(run_id, status="RUNNING")


def epoch_metrics(valid_key: str = "valid/mae") -> tuple[str, ...]:
    """The per-epoch metrics every training run logs (``valid_key``: ``loop.valid_key``)."""
    return ("train/query_loss", valid_key, "train/tasks_per_s", "train/epoch_s")


def logged_epochs(
    uri: str, run_id: str, after: int = -1, valid_key: str = "valid/mae"
) -> list[dict[str, float]]:
    """The per-epoch rows (``epoch_metrics``) rank 0 has logged to the run, epochs > ``after``.

    What the driver prints while Ray trains: the run is the one record every worker and
    the driver can reach, locally or on a cluster.
    """
    client = client_for(uri)
    rows: dict[int, dict[str, float]] = {}
    keys = epoch_metrics(valid_key)
    for key in keys:
        for m in client.get_metric_history(run_id, key):
            if m.step > after:
                rows.setdefault(m.step, {"epoch": m.step})[key] = m.value
    return [rows[e] for e in sorted(rows) if len(rows[e]) == len(keys) + 1]


class EpochLogger:
    """Per-epoch metrics of one run (rank 0 only), idempotent across worker restarts.

    A worker group restarted from a checkpoint re-reports nothing twice: an epoch already
    logged (the step is in the run's history) is skipped, and epochs a crash left unlogged
    are filled in from the restored history.
    """

    def __init__(self, uri: str, run_id: str, valid_key: str = "valid/mae") -> None:
        self.client, self.run_id = client_for(uri), run_id
        history = self.client.get_metric_history(run_id, valid_key)
        self.logged = {m.step for m in history}

    def log(self, rows: Iterable[dict[str, float]]) -> None:
        metrics = []
        for row in rows:
            step = int(row["epoch"])
            if step in self.logged:
                continue
            metrics += [
                mlflow.entities.Metric(k, float(v), 0, step) for k, v in row.items() if k != "epoch"
            ]
            self.logged.add(step)
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)


@contextlib.contextmanager
def _at_level(name: str, level: int) -> Iterator[None]:
    """Logger ``name`` at ``level`` for a block (``setLevel``, so its cache is cleared)."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def finish_run(
    uri: str,
    run_id: str,
    *,
    checkpoint_dir: str | os.PathLike,
    history: list[dict[str, float]],
    summary: dict[str, float],
    model_name: str,
    alias: str = CANDIDATE,
    end_status: str | None = "FINISHED",
) -> str:
    """Log the final checkpoint, learning curve and model; register it; end the run
    (with ``end_status``; None leaves the run's status as it is).

    Returns:
        ``models:/<model_name>@<alias>``.
    """
    client = client_for(uri)
    for k, v in summary.items():
        client.log_metric(run_id, k, float(v))
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "learning_curve.png"
        from metarec import plots  # matplotlib: only when there is a figure to draw

        plots.learning_curves(
            {"meta-training": [{"label": "this run", "rows": history}]},
            png,
            title="Learning curve",
        )
        client.log_artifact(run_id, str(png))
    client.log_artifacts(run_id, str(checkpoint_dir), artifact_path="checkpoint")
    # (its CloudPickle caution and "cannot infer a signature" are about this very class:
    # known and harmless: not news to print at every run)
    with using_uri(uri), mlflow.start_run(run_id=run_id), _at_level("mlflow.pyfunc", logging.ERROR):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=MetarecPyfunc(),
            artifacts={"checkpoint": str(Path(checkpoint_dir) / FILENAME)},
            pip_requirements=["metarec", "torch", "pandas"],
        )
        with contextlib.redirect_stderr(io.StringIO()):  # its "Successfully registered..."
            version = mlflow.register_model(info.model_uri, model_name).version
    client.set_registered_model_alias(model_name, alias, version)
    client.set_tag(run_id, "metarec.registered", f"{model_name}/{version}")
    if end_status is not None:
        client.set_terminated(run_id, end_status)
    return f"models:/{model_name}@{alias}"


TRIAL_STATUS = {"completed": "FINISHED", "stopped_early": "KILLED", "error": "FAILED"}


def set_trial_status(uri: str, run_id: str, status: str) -> None:
    """End a trial's run: FINISHED (completed), KILLED (stopped early by ASHA) or FAILED."""
    client = client_for(uri)
    client.set_tag(run_id, "metarec.trial_status", status)
    client.set_terminated(run_id, TRIAL_STATUS[status])


def finish_sweep(
    uri: str, run_id: str, table: list[dict[str, Any]], key: str = "best/valid_mae"
) -> None:
    """The sweep's parent run: summary table (CSV + Markdown), a plot, the best score
    (``key``: ``loop.best_key``; the table's ``best_valid_mae`` column holds that
    objective, 1 - NDCG@10 on implicit data)."""
    client = client_for(uri)
    frame = pd.DataFrame(table).drop(columns=["checkpoint"], errors="ignore")
    with tempfile.TemporaryDirectory() as tmp:
        frame.to_csv(Path(tmp) / "trials.csv", index=False)
        (Path(tmp) / "trials.md").write_text(markdown_table(frame))
        from metarec import plots

        plots.sweep(frame, Path(tmp) / "sweep.png")
        client.log_artifacts(run_id, tmp)
    finite = frame["best_valid_mae"].dropna()
    if len(finite):
        client.log_metric(run_id, key, float(finite.min()))
    client.set_tag(run_id, "metarec.best_trial", str(table[0]["trial"]))
    client.set_terminated(run_id)


def markdown_table(frame: pd.DataFrame) -> str:
    """A pipe table (floats to 4 places) without pandas' optional tabulate dependency."""

    def cell(v: Any) -> str:
        return (
            f"{v:.4g}"
            if isinstance(v, float) and abs(v) < 1e-2
            else (f"{v:.4f}" if isinstance(v, float) else str(v))
        )

    rows = ([cell(v) for v in row] for row in frame.itertuples(False))
    return "\n".join(pipe_table([str(c) for c in frame.columns], rows)) + "\n"


def _pairs(rows: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(a, b, {metric: {"diff", "ci95"}}) of a scenario's paired differences: on ratings
    ``_paired`` is {meta method: {baseline: ...}}; on implicit data it is every method
    against ``_paired["reference"]``, and ``_paired_meta`` the meta-learner against each."""
    paired = rows.get("_paired", {})
    if "reference" not in paired:
        return [(a, b, d) for a, against in paired.items() for b, d in against.items()]
    ref, meta = paired["reference"], rows.get("_paired_meta", {})
    pairs = {(a, ref): d for a, d in paired.items() if a != "reference"}
    pairs |= {(meta["method"], b): d for b, d in meta.items() if b != "method"}
    return [(a, b, d) for (a, b), d in pairs.items()]


def log_evaluation(
    uri: str,
    run_id: str,
    results: dict[str, dict[str, Any]],
    files: Iterable[Path],
    *,
    prefix: str,
) -> None:
    """Attach an evaluation to the model's run: every file under ``<prefix>/``, every mean
    metric as ``<prefix>/<scenario>/<method>/<metric>``, each paired difference and its CI
    as ``<prefix>/<scenario>/paired/<meta>-vs-<method>/<metric>/{diff,ci_lo,ci_hi}``
    (``@`` spelled ``_at_``: MLflow names allow no ``@``), and the protocol (splits,
    relevance threshold, the adaptation chosen on validation users) as the tag
    ``<prefix>/<scenario>/protocol``. Logging again overwrites files and tags and adds
    metric values."""
    client = client_for(uri)
    flat: list[tuple[str, float]] = []
    for scenario, rows in results.items():
        for method, row in rows.items():
            if not method.startswith("_"):
                flat += [
                    (f"{scenario}/{method}/{k}", v) for k, v in row.items() if isinstance(v, float)
                ]
        for a, b, diffs in _pairs(rows):
            for k, d in diffs.items():
                lo, hi = d["ci95"]
                base = f"{scenario}/paired/{a}-vs-{b}/{k}"
                flat += [(f"{base}/diff", d["diff"]), (f"{base}/ci_lo", lo), (f"{base}/ci_hi", hi)]
        if "_protocol" in rows:
            protocol = {k: v for k, v in rows["_protocol"].items() if k != "adapt_per_fit"}
            client.set_tag(run_id, f"{prefix}/{scenario}/protocol", json.dumps(protocol))
    metrics = [
        mlflow.entities.Metric(f"{prefix}/{name.replace('@', '_at_')}", float(v), 0, 0)
        for name, v in flat
    ]
    for lo in range(0, len(metrics), 1000):  # the REST API takes at most 1000 metrics a call
        client.log_batch(run_id, metrics=metrics[lo : lo + 1000])
    for f in files:
        client.log_artifact(run_id, str(f), artifact_path=prefix)


_Pyfunc = MetarecPyfunc  # models logged before the move pickled this name
