"""``metarec tune``: Ray Tune sweeps whose trials are ``metarec train`` runs.

Each trial builds the same ``TorchTrainer`` as ``metarec train`` (``train.build_trainer``)
inside a function trainable, with ``TuneReportCallback`` forwarding every epoch to Tune:
the pattern Ray 2.60 supports for Tune driving Train V2 (``Tuner(trainer)`` is refused).
ASHA stops poor trials on validation MAE. MLflow gets one parent run per sweep and a nested
child run per trial; at the end the best trial's model is registered as ``candidate`` and
the parent holds a summary table and a plot. ``--resume`` continues an interrupted sweep
(``Tuner.restore``) without redoing finished trials; an interrupted trial restarts from its
last epoch checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from metarec.checkpoint import load_checkpoint
from metarec.config import MetarecConfig, apply_overrides
from metarec.data.prepared import open_prepared
from metarec.errors import ConfigError, MetarecError
from metarec.loop import best_key
from metarec.ray_cluster import connect_ray
from metarec.train import (
    build_trainer,
    initial_checkpoint,
    model_name,
    run_checkpoints,
)
from metarec.train_state import TrainState

__all__ = ["Dimension", "SweepOutcome", "parse_space", "tune"]

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")
TRIAL_CPUS = 0.1  # the trial's own actor, which only drives its TorchTrainer
_ENTRY = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*=\s*(\w+)\s*\((.*)\)\s*$")


@dataclasses.dataclass(frozen=True)
class Dimension:
    key: str  # dotted config key
    kind: str  # one of DISTRIBUTIONS
    values: tuple[Any, ...]  # (lo, hi) for ranges, the values for choice/grid


def parse_space(entries: tuple[str, ...], base: MetarecConfig) -> list[Dimension]:
    """Parse and check ``tune.space`` before any trial starts.

    Every bound and value is applied to ``base`` and validated, so an unknown key, a value
    of the wrong type, a negative learning rate or an unknown algorithm fail here, naming
    the entry, not twenty minutes into a sweep.
    """
    if not entries:
        raise ConfigError("tune.space: empty; expected at least one '<key>=<dist>(args)' entry")
    dims, seen = [], set()
    for i, entry in enumerate(entries):
        where = f"tune.space[{i}] {entry!r}"
        m = _ENTRY.match(entry)
        if not m:
            raise ConfigError(f"{where}: expected '<config key>=<distribution>(<args>)'")
        key, kind, raw = m.groups()
        if kind not in DISTRIBUTIONS:
            raise ConfigError(f"{where}: distribution {kind!r}; expected one of {DISTRIBUTIONS}")
        if key in seen:
            raise ConfigError(f"{where}: {key} appears twice")
        seen.add(key)
        values = tuple(yaml.safe_load(v) for v in raw.split(",") if v.strip())
        if kind in ("choice", "grid") and not values:
            raise ConfigError(f"{where}: {kind}() is empty; expected at least one value")
        if kind in ("loguniform", "uniform", "randint"):
            if len(values) != 2 or not all(isinstance(v, int | float) for v in values):
                raise ConfigError(f"{where}: {kind} takes two numbers (low, high)")
            if not values[0] < values[1]:
                raise ConfigError(f"{where}: low {values[0]} is not below high {values[1]}")
            if kind == "loguniform" and values[0] <= 0:
                raise ConfigError(f"{where}: loguniform needs low > 0, got {values[0]}")
        for v in values:
            try:
                apply_overrides(base, **{key: v})
            except MetarecError as e:
                raise ConfigError(f"{where}: {e}") from e
        dims.append(Dimension(key, kind, values))
    return dims


def _ray_space(dims: list[Dimension]) -> dict[str, Any]:
    from ray import tune

    make = {
        "loguniform": lambda v: tune.loguniform(*v),
        "uniform": lambda v: tune.uniform(*v),
        "randint": lambda v: tune.randint(*v),
        "choice": lambda v: tune.choice(list(v)),
        "grid": lambda v: tune.grid_search(list(v)),
    }
    return {d.key: make[d.kind](d.values) for d in dims}


@dataclasses.dataclass(frozen=True)
class SweepOutcome:
    name: str
    parent_run_id: str
    model_uri: str | None  # the best trial's registered model
    best: dict[str, Any]  # the best trial's row of the summary table
    table: list[dict[str, Any]]  # one row per trial
    feedback: str = "explicit"  # the data's kind: which validation objective ranked them


def _trial(params: dict[str, Any], *, spec: dict[str, Any]) -> None:
    """One trial: a full ``metarec train`` run on Ray Train, reporting each epoch to Tune."""
    from ray import tune as ray_tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from metarec import tracking

    cfg = apply_overrides(MetarecConfig.from_dict(spec["config"]), **params)
    ds = open_prepared(spec["data_dir"])
    trial_id = ray_tune.get_context().get_trial_id()
    uri = spec["tracking_uri"]
    run_id = tracking.find_run_by_tag(uri, "metarec.trial_id", f"{spec['name']}/{trial_id}")
    if run_id is None:
        run_id = tracking.start_run(
            uri,
            run_name=f"{spec['name']}-{trial_id}",
            config=cfg.to_dict(),
            manifest=ds.manifest,
            tags={
                "mlflow.parentRunId": spec["parent_run_id"],
                "metarec.trial_id": f"{spec['name']}/{trial_id}",
                "metarec.sweep": spec["name"],
            },
        )
    storage = Path(spec["storage"]) / "trials"
    latest = run_checkpoints(storage / f"trial_{trial_id}")
    trainer = build_trainer(
        cfg,
        ds,
        init=initial_checkpoint(cfg, ds),
        name=f"trial_{trial_id}",
        storage=storage,
        tracking_uri=uri,
        run_id=run_id,
        workers=cfg.tune.workers_per_trial,
        cpus_per_worker=spec["cpus_per_worker"],
        resume_from=str(latest[-1]) if latest else None,  # a restored, interrupted trial
        callbacks=[TuneReportCallback()],
    )
    trainer.fit()


def tune(
    cfg: MetarecConfig,
    data_dir: str | os.PathLike,
    *,
    work_dir: str | os.PathLike = "work",
    tracking_uri: str | None = None,
    resume: str | None = None,
) -> SweepOutcome:
    """Run (or, with ``resume=<sweep name>``, continue) a sweep; register its best model."""
    from metarec import tracking

    work = Path(work_dir).resolve()
    sweeps = work / "ray_results" / "sweeps"
    if resume:
        spec_path = sweeps / resume / "metarec_sweep.json"
        if not spec_path.is_file():
            raise ConfigError(f"--resume {resume}: no sweep under {sweeps}")
        spec = json.loads(spec_path.read_text())
        cfg = MetarecConfig.from_dict(spec["config"], where=str(spec_path))
    ds = open_prepared(data_dir)
    dims = parse_space(cfg.tune.space, cfg)  # fails before Ray starts
    search_alg = None
    if cfg.tune.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as e:  # optuna missing
            raise ConfigError("tune.search: got 'optuna', which is not installed") from e
        if any(d.kind == "grid" for d in dims):
            raise ConfigError("tune.search: optuna cannot take grid(...) entries; use choice")
        search_alg = OptunaSearch()
    connect_ray()
    import ray

    # Budget per trial: its driver actor (TRIAL_CPUS) and its Train workers; 1.5 CPUs stay
    # free for Ray Data's file listing (a whole CPU) and reads. Small machines: trials queue.
    cluster_cpus = ray.cluster_resources().get("CPU", 1)
    cpus_per_worker = cfg.train.cpus_per_worker or (0.25 if cluster_cpus < 8 else 1.0)
    per_trial = TRIAL_CPUS + cfg.tune.workers_per_trial * cpus_per_worker
    concurrent = cfg.tune.max_concurrent or max(1, math.floor((cluster_cpus - 1.5) / per_trial))
    if not resume:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        name = f"sweep-{cfg.train.scenario}-{stamp}"
        uri = tracking.resolve_tracking_uri(tracking_uri, work)
        parent = tracking.start_run(
            uri,
            run_name=name,
            config=cfg.to_dict(),
            manifest=ds.manifest,
            tags={"metarec.kind": "sweep"},
        )
        spec = {
            "name": name,
            "config": cfg.to_dict(),
            "data_dir": str(Path(data_dir).resolve()),
            "tracking_uri": uri,
            "parent_run_id": parent,
            "storage": str(work / "ray_results"),
            "cpus_per_worker": cpus_per_worker,
            "feedback": ds.feedback,
        }
        (sweeps / name).mkdir(parents=True, exist_ok=True)
        (sweeps / name / "metarec_sweep.json").write_text(json.dumps(spec, indent=2))
    (work / "last_sweep.json").write_text(json.dumps({"name": spec["name"]}))
    name, uri = spec["name"], spec["tracking_uri"]
    if resume:
        tracking.reopen_run(uri, spec["parent_run_id"])
    # The parent run ends FAILED on an error, KILLED on Ctrl-C/SIGTERM; the trials' runs
    # end in _finish (an interrupted trial's stays RUNNING until the sweep is resumed).
    with tracking.ends_honestly(uri, spec["parent_run_id"], killed=(SweepInterrupted,)):
        tuner = _tuner(spec, dims, concurrent, search_alg, resume=bool(resume))
        grid = tuner.fit()
        # Trials Tune had not created yet when Ctrl-C came are missing from the grid.
        planned = cfg.tune.num_samples * math.prod(len(d.values) for d in dims if d.kind == "grid")
        unfinished = max(planned, len(grid)) - grid.num_terminated - grid.num_errors
        if unfinished:
            raise SweepInterrupted(
                f"sweep {name} interrupted with {unfinished} trials unfinished; continue it "
                f"with `metarec tune --data {data_dir} --resume {name}`"
            )
        return _finish(grid, spec, dims, ds.manifest)


def _tuner(
    spec: dict[str, Any], dims: list[Dimension], concurrent: int, search_alg: Any, *, resume: bool
) -> Any:
    """The sweep's ``Tuner``: a new one, or (``resume``) the interrupted one restored."""
    from ray import tune as ray_tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler

    # Tune's per-trial CSV/JSON logs, but not its TensorBoard logger: tensorboardX is not
    # installed, and Ray would suggest a `tensorboard` command that cannot run.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    cfg = MetarecConfig.from_dict(spec["config"])
    name = spec["name"]
    sweeps = Path(spec["storage"]) / "sweeps"
    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(_trial, spec=spec), {"CPU": TRIAL_CPUS}
    )
    if resume:
        return ray_tune.Tuner.restore(
            str(sweeps / name), trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    return ray_tune.Tuner(
        trainable,
        param_space=_ray_space(dims),
        tune_config=ray_tune.TuneConfig(
            # the best validation objective so far (MAE on ratings): what metarec ranks
            # trials by, so Ray's "Current best trial" names the trial metarec registers
            metric=best_key(spec.get("feedback", "explicit")),
            mode="min",
            num_samples=cfg.tune.num_samples,
            max_concurrent_trials=concurrent,
            search_alg=search_alg,
            scheduler=ASHAScheduler(
                time_attr="epochs_done",
                max_t=cfg.train.epochs,
                grace_period=min(cfg.tune.grace_period, cfg.train.epochs),
                reduction_factor=cfg.tune.reduction_factor,
            ),
        ),
        run_config=ray_tune.RunConfig(
            storage_path=str(sweeps),
            name=name,
            callbacks=[CSVLoggerCallback(), JsonLoggerCallback()],
        ),
    )


class SweepInterrupted(MetarecError):
    """Tune stopped before every trial ended (Ctrl-C): nothing is registered yet."""


ALWAYS = (
    "meta.algorithm",
    "meta.inner_solver",
    "meta.prior_precision",
    "meta.inner_lr",
    "meta.outer_lr",
    "meta.inner_steps",
)


def _get(cfg: MetarecConfig, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


_TRIAL_ID = re.compile(r"_([0-9a-f]{5}_\d{5})(?:_|$)")


def _finish(grid: Any, spec: dict[str, Any], dims: list[Dimension], manifest: dict) -> SweepOutcome:
    """Trial statuses into MLflow, the best model registered, the summary on the parent.

    A trial's outcome is read from its own last checkpoint (epochs run, early-stopping
    flag, best validation MAE), not from what Tune last received: a trial ASHA stops at
    its final epoch and one it stops halfway look alike to Tune.
    """
    from metarec import tracking

    uri, name = spec["tracking_uri"], spec["name"]
    feedback = spec.get("feedback", "explicit")  # sweeps started before implicit data: ratings
    storage = Path(spec["storage"]) / "trials"
    table, loaded = [], {}
    for result in grid:
        m = _TRIAL_ID.search(Path(result.path).name)
        trial_id = m.group(1) if m else None
        found = run_checkpoints(storage / f"trial_{trial_id}") if trial_id else []
        ckpt = load_checkpoint(found[-1], dataset_hash=manifest["dataset_hash"]) if found else None
        state = TrainState.from_dict(ckpt["state"]) if ckpt else TrainState()
        epochs = MetarecConfig.from_dict(ckpt["config"]).train.epochs if ckpt else 0
        if result.error or ckpt is None:
            status = "error"
        else:
            status = "completed" if state.stopped or state.epoch >= epochs else "stopped_early"
        run_id = tracking.find_run_by_tag(uri, "metarec.trial_id", f"{name}/{trial_id}")
        trial_cfg = apply_overrides(MetarecConfig.from_dict(spec["config"]), **result.config)
        table.append(
            {
                "trial": trial_id,
                **{k: _get(trial_cfg, k) for k in ALWAYS},
                **{d.key: result.config.get(d.key) for d in dims},
                "best_valid_mae": state.best_valid_mae if ckpt else math.nan,
                "epochs": state.epoch,
                "status": status,
                "run_id": run_id,
                "checkpoint": str(found[-1]) if found else None,
            }
        )
        loaded[trial_id] = ckpt
        if run_id is not None:
            tracking.set_trial_status(uri, run_id, status)
    table.sort(key=lambda r: (not math.isfinite(r["best_valid_mae"]), r["best_valid_mae"]))
    best, model_uri = table[0], None
    if best["run_id"] is not None and math.isfinite(best["best_valid_mae"]):
        state = TrainState.from_dict(loaded[best["trial"]]["state"])
        model_uri = tracking.finish_run(
            uri,
            best["run_id"],
            checkpoint_dir=Path(best["checkpoint"]).parent,
            history=state.history,
            summary={
                best_key(feedback): state.best_valid_mae,
                "best/epoch": state.best_epoch,
            },
            model_name=model_name(manifest),
            end_status=None,
        )
    tracking.finish_sweep(uri, spec["parent_run_id"], table, best_key(feedback))
    return SweepOutcome(name, spec["parent_run_id"], model_uri, best, table, feedback)
