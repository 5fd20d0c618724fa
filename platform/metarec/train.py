"""``metarec train``: the meta-training loop on Ray Train, tracked in MLflow.

The driver builds the initial model (item factors need every training rating), starts an
MLflow run and a ``TorchTrainer``. The driver, which has read the task tables for that
anyway, hands them to Ray Data as in-memory Arrow blocks (``from_arrow``): a
``read_parquet`` would make each worker run its own read, start a Python process per read
task, and spent most of a short run's start-up there. Each worker takes the tables through
Ray Data and keeps its own part (``loop.rank_rows``); each runs ``loop.run_epochs`` on it,
summing meta-gradients across workers with one all-reduce per meta-batch (gloo on CPU, NCCL
on GPU), so N workers take the same steps as one process (see ``loop.Shard``). Rank 0
validates, checkpoints every epoch and logs the epoch to MLflow; a worker group that dies
restarts from the last checkpoint (``FailureConfig``), with no epoch lost or repeated.

Why every worker reads all training tasks and keeps every ``world``-th one (in user-id
order, from its rank) rather than taking a split from Ray Train: Ray Train's
``DataConfig(datasets_to_split=...)`` always calls ``streaming_split(equal=True)``, which
truncates up to N-1 rows, a different set each run and after each restart. The alternative,
``streaming_split(equal=False)``, hands whole blocks to whichever worker asks first: no row
is lost, but a single-file task table (one block) can land entirely on one worker, leaving
the other with nothing, and which worker holds a task changes from run to run. The
``rank::world`` split is a partition that depends on the task ids alone: the same for any
read order, block layout or restart, balanced to one task. The cost is that each worker
reads the whole task table's blocks, zero-copy from Ray's object store (shared pages), and
copies out only its own rows, so a worker's own memory holds its part. Every epoch
then checks, with one all-reduce of per-task counts, that each of the manifest's training
tasks was trained on exactly once (``loop.check_coverage``), and fails the run otherwise.

Why not ``prepare_model`` (DDP): the meta-gradient comes from a functional second-order
pass, not from one ``forward`` of the module, and gradients of the parameter groups
that a batch leaves unused must still be all-reduced (as zeros) in the same order on every
worker. One explicit flat all-reduce does both, and is what DDP's bucketed reducer does.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metarec.batch import from_table, ragged_from_table
from metarec.checkpoint import (
    load_checkpoint,
    restart_point,
    save_checkpoint,
    standalone_checkpoint,
)
from metarec.config import MetarecConfig, apply_overrides
from metarec.data.prepared import PreparedDataset, open_prepared
from metarec.errors import ConfigError
from metarec.initialise import build_learner
from metarec.loop import best_key, valid_key
from metarec.ray_cluster import connect_ray
from metarec.train_progress import epoch_lines
from metarec.train_state import TrainState
from metarec.train_worker import worker_loop

__all__ = ["TrainOutcome", "resume", "resumed_config", "run_checkpoints", "train"]


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOutcome:
    run_name: str  # the Ray Train run (directory under the storage path) and MLflow run name
    run_id: str  # MLflow run id
    model_uri: str  # models:/<name>@candidate
    best_epoch: int
    best_valid_mae: float  # the best validation objective (MAE; 1 - NDCG@10 on implicit data)
    feedback: str  # the dataset's kind, which says which objective (``loop.valid_key``)
    epochs_run: int
    checkpoint: Path  # the final checkpoint (a local copy)


def default_cpus_per_worker(workers: int, cluster_cpus: float) -> float:
    """Leave a CPU beside the Train workers for Ray's own tasks (Ray Data, a Tune trial's
    driver): on a 2-CPU box, workers holding both CPUs once deadlocked Ray Data's reads."""
    return max(0.25, min(1.0, (cluster_cpus - 1) / workers))


def train(
    cfg: MetarecConfig,
    data_dir: str | os.PathLike,
    *,
    workers: int | None = None,
    use_gpu: bool | None = None,
    cpus_per_worker: float | None = None,
    work_dir: str | os.PathLike = "work",
    tracking_uri: str | None = None,
    max_failures: int = 2,
) -> TrainOutcome:
    """Meta-train ``cfg`` on a prepared dataset with Ray Train; track it in MLflow.

    Args:
        workers, use_gpu, cpus_per_worker: override ``cfg.train``'s (Ray Train workers; one
            GPU each, default when CUDA is present; logical CPUs each, default: leave one
            for Ray Data's reads).
        work_dir: where Ray Train's run directories and the default MLflow store live.
    """
    from metarec import tracking

    ds = open_prepared(data_dir)
    cfg = _with_resources(cfg, workers=workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_name = f"{cfg.meta.algorithm}-{cfg.train.scenario}-{stamp}"
    init = initial_checkpoint(cfg, ds)
    uri = tracking.resolve_tracking_uri(tracking_uri, work_dir)
    _check_workers(cfg, ds)  # a user error must not leave a FAILED run behind
    connect_ray()  # before the run's guard: ray.init replaces the SIGTERM handler
    run_id = tracking.start_run(uri, run_name=run_name, config=cfg.to_dict(), manifest=ds.manifest)
    return _run(cfg, ds, init, run_name, run_id, uri, work_dir, None, max_failures)


def resume(
    run_name: str,
    data_dir: str | os.PathLike,
    *,
    epochs: int | None = None,
    workers: int | None = None,
    use_gpu: bool | None = None,
    cpus_per_worker: float | None = None,
    placement: str | None = None,
    work_dir: str | os.PathLike = "work",
    tracking_uri: str | None = None,
    max_failures: int = 2,
) -> TrainOutcome:
    """Continue the run ``run_name`` from its latest checkpoint, into the same MLflow run.

    It keeps its own config (``resumed_config``): only the arguments here change it.

    Args:
        epochs: train until this many epochs in all (default: the run's own count).
        workers, use_gpu, cpus_per_worker, placement: as ``train`` (``train.placement``);
            default: what the run last used.
    """
    from metarec import tracking

    ds = open_prepared(data_dir)
    run_dir = Path(work_dir).resolve() / "ray_results" / run_name
    latest = _latest_checkpoint(run_dir)
    ckpt = load_checkpoint(latest, dataset_hash=ds.manifest["dataset_hash"])
    cfg = resumed_config(
        ckpt,
        run_name=run_name,
        epochs=epochs,
        workers=workers,
        use_gpu=use_gpu,
        cpus_per_worker=cpus_per_worker,
        placement=placement,
    )
    _check_workers(cfg, ds)
    uri = tracking.resolve_tracking_uri(tracking_uri, work_dir)
    run_id = tracking.find_run(uri, run_name)
    init = restart_point(ckpt, cfg)
    connect_ray()
    tracking.reopen_run(uri, run_id)
    return _run(cfg, ds, init, run_name, run_id, uri, work_dir, str(latest), max_failures)


def _run(
    cfg: MetarecConfig,
    ds: PreparedDataset,
    init: dict[str, Any],
    run_name: str,
    run_id: str,
    uri: str,
    work_dir: str | os.PathLike,
    resume_from: str | None,
    max_failures: int,
) -> TrainOutcome:
    """Fit on Ray Train and register the model; the MLflow run ends FAILED or KILLED if
    anything here raises or is interrupted (``tracking.ends_honestly``)."""
    from metarec import tracking

    with tracking.ends_honestly(uri, run_id):
        trainer = build_trainer(
            cfg,
            ds,
            init=init,
            name=run_name,
            storage=Path(work_dir).resolve() / "ray_results",
            tracking_uri=uri,
            run_id=run_id,
            resume_from=resume_from,
            max_failures=max_failures,
        )
        t0 = time.perf_counter()
        with epoch_lines(uri, run_id, cfg.train.epochs, valid_key(ds.feedback)):
            result = trainer.fit()
        wall = time.perf_counter() - t0
        with result.checkpoint.as_directory() as d:
            final = load_checkpoint(d, dataset_hash=ds.manifest["dataset_hash"])
        state = TrainState.from_dict(final["state"])
        local = Path(work_dir).resolve() / "checkpoints" / run_name
        save_checkpoint(final, local)
        model_uri = tracking.finish_run(
            uri,
            run_id,
            checkpoint_dir=local,
            history=state.history,
            summary={
                best_key(ds.feedback): state.best_valid_mae,
                "best/epoch": state.best_epoch,
                "wall_s": wall,
                "train/tasks_per_s_mean": _mean(r.get("train/tasks_per_s") for r in state.history),
            },
            model_name=model_name(ds.manifest),
        )
    return TrainOutcome(
        run_name=run_name,
        run_id=run_id,
        model_uri=model_uri,
        best_epoch=state.best_epoch,
        best_valid_mae=state.best_valid_mae,
        feedback=ds.feedback,
        epochs_run=state.epoch,
        checkpoint=local / "checkpoint.pt",
    )


def _with_resources(
    cfg: MetarecConfig,
    *,
    workers: int | None,
    use_gpu: bool | None,
    cpus_per_worker: float | None,
    epochs: int | None = None,
    placement: str | None = None,
) -> MetarecConfig:
    """``cfg`` with the given (not None) worker resources and epochs."""
    given = {
        "train.workers": workers,
        "train.use_gpu": use_gpu,
        "train.cpus_per_worker": cpus_per_worker,
        "train.placement": placement,
        "train.epochs": epochs,
    }
    return apply_overrides(cfg, **{k: v for k, v in given.items() if v is not None})


def initial_checkpoint(cfg: MetarecConfig, ds: PreparedDataset) -> dict[str, Any]:
    """The untrained learner as a checkpoint dict: what every worker starts from.

    Built once on the driver (item factors are fitted by ALS on every training rating, which
    no single worker holds) and shipped to workers, which then need no access to the
    prepared directory's side tables.
    """
    scenario = cfg.train.scenario
    if scenario not in ds.manifest["scenarios"]:
        raise ConfigError(
            f"train.scenario: got {scenario!r}; {ds.root} has {sorted(ds.manifest['scenarios'])}"
        )
    train_tasks = ragged_from_table(ds.tasks(scenario, "train"))
    learner = build_learner(cfg, ds, train_tasks, from_table(ds.tasks(scenario, "valid")))
    return standalone_checkpoint(cfg, learner, ds, train_tasks)


def build_trainer(
    cfg: MetarecConfig,
    ds: PreparedDataset,
    *,
    init: dict[str, Any],
    name: str,
    storage: Path,
    tracking_uri: str,
    run_id: str,
    workers: int | None = None,
    use_gpu: bool | None = None,
    cpus_per_worker: float | None = None,
    resume_from: str | None = None,
    max_failures: int = 2,
    callbacks: list[Any] | None = None,
) -> Any:
    """The ``TorchTrainer`` of one meta-training run (``train`` and each Tune trial)."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    workers = cfg.train.workers if workers is None else workers
    use_gpu = cfg.train.use_gpu if use_gpu is None else use_gpu
    use_gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
    cpus_per_worker = cfg.train.cpus_per_worker if cpus_per_worker is None else cpus_per_worker
    n_tasks = _check_workers(cfg, ds, workers)
    if cpus_per_worker is None:
        cpus_per_worker = default_cpus_per_worker(workers, ray.cluster_resources().get("CPU", 1))
    ray.data.DataContext.get_current().enable_progress_bars = False  # epochs have their own
    return TorchTrainer(
        worker_loop,
        train_loop_config={
            "init": init,
            "resume_from": resume_from,
            "tracking_uri": tracking_uri,
            "run_id": run_id,
            "threads": max(1, math.floor(cpus_per_worker)),
            "expected_tasks": n_tasks,
        },
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
            placement_strategy=cfg.train.placement,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
        datasets={
            "train": ray.data.from_arrow(ds.tasks(cfg.train.scenario, "train")),
            "valid": ray.data.from_arrow(ds.tasks(cfg.train.scenario, "valid")),
        },
        # No Ray split (it drops up to N-1 tasks): each worker keeps its rank's tasks itself.
        dataset_config=DataConfig(datasets_to_split=[]),
    )


def _check_workers(cfg: MetarecConfig, ds: PreparedDataset, workers: int | None = None) -> int:
    """The scenario's training-task count (the manifest's); at most one worker per task."""
    workers = cfg.train.workers if workers is None else workers
    n_tasks = int(ds.manifest["scenarios"][cfg.train.scenario]["train"]["tasks"])
    if workers < 1 or workers > n_tasks:
        raise ConfigError(f"--workers: got {workers}; expected 1..{n_tasks}")
    return n_tasks


def model_name(manifest: dict[str, Any]) -> str:
    """Registered model name: one per dataset (source and hash prefix)."""
    return f"metarec-{manifest['source']['name']}-{manifest['dataset_hash'][:8]}"


def _mean(values: Any) -> float:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else float("nan")


def run_checkpoints(run_dir: Path) -> list[Path]:
    """The epoch checkpoints Ray Train kept for one run directory, oldest epoch first.

    Ordered by the epoch count stored in each checkpoint, not by modification time or
    directory name (Ray 2.60 names them by wall-clock time): a copied, restored or
    re-synced run directory keeps its order.
    """
    found = run_dir.glob("checkpoint_*/checkpoint.pt")
    return sorted(found, key=lambda p: (int(load_checkpoint(p)["state"]["epoch"]), p.parent.name))


def _latest_checkpoint(run_dir: Path) -> Path:
    found = run_checkpoints(run_dir)
    if not found:
        raise ConfigError(f"--resume: no checkpoint under {run_dir}")
    return found[-1]


def resumed_config(
    ckpt: dict[str, Any],
    *,
    run_name: str,
    epochs: int | None = None,
    workers: int | None = None,
    use_gpu: bool | None = None,
    cpus_per_worker: float | None = None,
    placement: str | None = None,
) -> MetarecConfig:
    """The stopped run's own config, with what may change on resume applied.

    Workers, GPUs, CPUs and their placement only change how the same steps are computed
    (meta-batches are cut from all tasks whatever the worker count: ``loop.Shard``), so
    they are honoured.
    Epochs change only when asked, and only upwards: a resume without ``epochs`` finishes
    the epochs the run was started with. Anything else (algorithm, learning rates, seed,
    scenario) would continue another experiment's optimizer state and history under this
    run's name, so the CLI refuses those flags with ``--resume``.

    Raises:
        ConfigError: the run has nothing left to do, or ``epochs`` is not above its count.
    """
    cfg = MetarecConfig.from_dict(ckpt["config"], where="checkpoint config")
    state = TrainState.from_dict(ckpt["state"])
    done = state.epoch
    if state.stopped:
        raise ConfigError(
            f"--resume {run_name}: got a run that early stopping ended after {done} epochs "
            f"(train.patience {cfg.train.patience}); expected one that was interrupted. "
            "Start a new run to train longer."
        )
    if epochs is None and done >= cfg.train.epochs:
        raise ConfigError(
            f"--resume {run_name}: got a run that has done all its {done} epochs; expected an "
            f"interrupted one. Pass --epochs N (N > {done}) to train it further."
        )
    if epochs is not None and epochs <= done:
        raise ConfigError(
            f"--epochs: got {epochs}; expected more than the {done} epochs {run_name} has done"
        )
    return _with_resources(
        cfg,
        workers=workers,
        use_gpu=use_gpu,
        cpus_per_worker=cpus_per_worker,
        epochs=epochs,
        placement=placement,
    )
