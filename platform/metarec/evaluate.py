"""Scenario x method evaluation: the meta-learner against every baseline, over seeds.

Every method is a *scorer*: given evaluation tasks and items, it returns ratings using only
each task's support set. The meta-learner and the fine-tuned global model score through the
same ``meta.adapt`` that serving uses, so what is measured here is what a user gets.
Baselines are tuned on validation users (grids in ``baselines``), then scored on test users.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from metarec.baselines import classic_baselines
from metarec.batch import TaskBatch, from_table
from metarec.config import MetarecConfig, apply_overrides
from metarec.data.prepared import PreparedDataset
from metarec.loop import FitResult, fit, masked_mae, predict_items
from metarec.meta import MetaLearner
from metarec.metrics import catalog_metrics, mean_metrics, query_metrics

__all__ = [
    "BASELINES",
    "REPORTED",
    "AdaptedScorer",
    "SeedFit",
    "SeedScores",
    "evaluate",
    "fit_methods",
    "format_table",
    "model_fits",
    "score",
    "score_tasks",
    "write_json_atomic",
    "write_results",
]

BASELINES = (
    "global_mean",
    "item_mean",
    "user_mean",
    "bias",
    "mf_foldin",
    "global_model",
    "finetune",
)
REPORTED = ("mae", "rmse", "ndcg@3", "p@5", "ndcg@5", "mrr@5", "recall@10", "ndcg@10")
FINETUNE_LRS = (0.01, 0.03, 0.1, 0.3, 1.0)  # plus the meta-learner's own inner_lr


class Scorer(Protocol):
    def predict_items(self, tasks: TaskBatch, items: Tensor) -> Tensor: ...


class AdaptedScorer:
    """A network adapted per task on its support set (``loop.predict_items``).

    Args:
        steps, inner_lr: the adaptation; defaults are the learner's own (meta-learned lrs
            for Meta-SGD), overridden for the fine-tune and global-model baselines.
    """

    def __init__(
        self, learner: MetaLearner, *, steps: int | None = None, inner_lr: float | None = None
    ) -> None:
        self.learner, self.steps, self.inner_lr = learner, steps, inner_lr

    def predict_items(self, tasks: TaskBatch, items: Tensor) -> Tensor:
        return predict_items(self.learner, tasks, items, steps=self.steps, inner_lr=self.inner_lr)


def score_tasks(
    scorer: Scorer,
    tasks: TaskBatch,
    n_items: int | None = None,
    *,
    chunk: int = 1024,
    desc: str | None = None,
) -> dict[str, Tensor]:
    """Per-task metrics, (T,) each: query metrics, and full-catalogue ranking metrics when
    ``n_items`` is given.

    Tasks go through in chunks of ``chunk`` users: within a chunk every user is scored at
    once (no loop over users); chunks bound the (users, catalogue) score matrix, and a
    progress bar (terminals only) counts them.
    """
    out: dict[str, list[Tensor]] = {}
    with tqdm(total=tasks.num_tasks, desc=desc, unit="user", disable=None, leave=False) as bar:
        for lo in range(0, tasks.num_tasks, chunk):
            part = tasks.select(torch.arange(lo, min(lo + chunk, tasks.num_tasks)))
            for k, v in _score_chunk(scorer, part, n_items).items():
                out.setdefault(k, []).append(v)
            bar.update(part.num_tasks)
    return {k: torch.cat(v) for k, v in out.items()}


def _score_chunk(scorer: Scorer, tasks: TaskBatch, n_items: int | None) -> dict[str, Tensor]:
    pred = scorer.predict_items(tasks, tasks.query_items)
    metrics = query_metrics(pred.double(), tasks.query_ratings.double(), tasks.query_mask)
    if n_items is None:
        return metrics
    catalog = torch.arange(n_items).expand(tasks.num_tasks, n_items)
    scores = scorer.predict_items(tasks, catalog)  # (T, I)
    rows = torch.arange(tasks.num_tasks)[:, None]
    exclude = torch.zeros(tasks.num_tasks, n_items, dtype=torch.bool)
    exclude[
        rows.expand_as(tasks.support_items)[tasks.support_mask],
        tasks.support_items[tasks.support_mask],
    ] = True
    positives = torch.zeros_like(exclude)
    relevant = tasks.query_mask & (tasks.query_ratings >= 4.0)
    positives[rows.expand_as(tasks.query_items)[relevant], tasks.query_items[relevant]] = True
    return metrics | catalog_metrics(scores.double(), positives, exclude, k=10)


def score(scorer: Scorer, tasks: TaskBatch, n_items: int) -> dict[str, float]:
    """Query metrics and full-catalogue ranking metrics, averaged over tasks."""
    return mean_metrics(score_tasks(scorer, tasks, n_items))


def _tuned(make: Callable[[dict], Scorer], grid: Iterable[dict], valid: TaskBatch) -> Scorer:
    """The scorer of the grid point with the lowest validation MAE (first one on ties)."""
    best: tuple[float, Scorer] | None = None
    for hp in grid:
        scorer = make(hp)
        mae = masked_mae(scorer.predict_items(valid, valid.query_items), valid)
        if best is None or mae < best[0]:
            best = (mae, scorer)
    assert best is not None
    return best[1]


def _fit_with_bar(cfg: MetarecConfig, ds: PreparedDataset, scenario: str, desc: str) -> FitResult:
    """``fit`` with an epoch progress bar (terminals only: logs stay clean)."""
    with tqdm(total=cfg.train.epochs, desc=desc, unit="epoch", disable=None, leave=False) as bar:

        def progress(row: dict[str, float]) -> None:
            bar.update(1)
            bar.set_postfix({"valid_mae": f"{row['valid/mae']:.4f}"})

        return fit(cfg, ds, scenario=scenario, progress=progress)


@dataclass
class SeedFit:
    """Every method of one (scenario, seed), trained and tuned, ready to score test users.

    ``history`` is the meta-learner's learning curve when it was trained here (None when a
    given model was scored).
    """

    scenario: str
    seed: int
    method: str  # the meta-learner's name (its algorithm)
    scorers: dict[str, Scorer]
    history: list[dict[str, float]] | None = None


def fit_methods(
    cfg: MetarecConfig,
    ds: PreparedDataset,
    scenario: str,
    baselines: tuple[str, ...],
    *,
    log: Callable[[str], None] = lambda _: None,
    learner: MetaLearner | None = None,
    extra: dict[str, Scorer] | None = None,
) -> SeedFit:
    """Meta-train (unless ``learner`` is given) and tune every baseline for ``cfg.seed``.

    Args:
        extra: scorers built elsewhere (a transferred model), scored like the rest.
    """
    train, valid = (from_table(ds.tasks(scenario, s)) for s in ("train", "valid"))
    n_items = ds.manifest["counts"]["items"]
    method = cfg.meta.algorithm
    history = None
    if learner is None:
        log(f"[seed {cfg.seed}] meta-training {method} on {scenario}")
        fitted = _fit_with_bar(cfg, ds, scenario, f"{method} seed {cfg.seed}")
        learner, history = fitted.learner, fitted.history
    scorers: dict[str, Scorer] = {method: AdaptedScorer(learner), **(extra or {})}
    grids = classic_baselines(seed=cfg.seed)
    for name in (b for b in baselines if b in grids):
        g = grids[name]
        scorers[name] = _tuned(
            lambda hp, g=g: g.cls(**hp).fit(train, n_items=n_items), g.grid, valid
        )
    if {"global_model", "finetune"} & set(baselines):
        log(f"[seed {cfg.seed}] training the global model (no adaptation)")
        plain = apply_overrides(cfg, **{"meta.inner_steps": 0, "meta.algorithm": "fomaml"})
        glob = _fit_with_bar(plain, ds, scenario, f"global model seed {cfg.seed}").learner
        glob.cfg = cfg.meta  # adapt the same parameter group as the meta-learner
        glob.adapted = learner.adapted
        if "global_model" in baselines:
            scorers["global_model"] = AdaptedScorer(glob, steps=0)
        if "finetune" in baselines:
            lrs = sorted({*FINETUNE_LRS, cfg.meta.inner_lr})
            scorers["finetune"] = _tuned(
                lambda hp: AdaptedScorer(glob, inner_lr=hp["lr"]), [{"lr": lr} for lr in lrs], valid
            )
    return SeedFit(scenario, cfg.seed, method, scorers, history)


def _train_pairs(ds: PreparedDataset, scenario: str) -> np.ndarray:
    """Sorted unique ``user * n_items + item`` of every rating in a scenario's train split."""
    train = from_table(ds.tasks(scenario, "train"))
    items, _, mask = train.merged()
    users = train.users
    n_items = ds.manifest["counts"]["items"]
    keys = users[:, None].expand_as(items)[mask] * n_items + items[mask]
    return np.unique(keys.numpy())


def model_fits(ds: PreparedDataset, trained_on: str, scenario: str) -> bool:
    """Whether a model trained on ``trained_on`` may be scored on ``scenario``'s test users.

    Only if it saw no rating that ``scenario``'s own training may not: scenarios share a
    user split, but e.g. ``warm`` and ``item_cold`` hold out ratings of *training* users
    (and new items) that ``user_cold`` trains on, so a ``user_cold`` model scored there
    would be tested on ratings it learned from. ``user_cold`` and ``temporal`` train on
    the same ratings; a ``warm`` model fits ``user_cold`` (it saw less).
    """
    if trained_on == scenario:
        return True
    if trained_on not in ds.scenarios:
        return False
    return bool(np.isin(_train_pairs(ds, trained_on), _train_pairs(ds, scenario)).all())


@dataclass
class SeedScores:
    """One seed's per-task test metrics of every method (what a report's plots need)."""

    fit: SeedFit
    test: TaskBatch
    per_task: dict[str, dict[str, Tensor]]  # method -> metric -> (T,)


def evaluate(
    cfg: MetarecConfig,
    ds: PreparedDataset,
    *,
    scenarios: Iterable[str],
    seeds: Iterable[int],
    baselines: Iterable[str] = BASELINES,
    log: Callable[[str], None] = lambda _: None,
    learner: MetaLearner | None = None,
    extra: dict[str, Scorer] | None = None,
    on_seed: Callable[[SeedScores], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """``{scenario: {method: {metric: mean, "std": {...}, "per_seed": {...}}}}``.

    Args:
        learner: a trained model (``--model``) to score instead of meta-training one per
            seed; seeds then vary only the baselines that train (MF, global model). It is
            scored only where it fits (``model_fits`` with its ``cfg.train.scenario``); other
            scenarios meta-train per seed with its config. The meta-learner's row says which
            (``"source"``: ``"model"`` or ``"fit"``).
        extra: more scorers to score on every scenario and seed (a transferred model).
        on_seed: called with each seed's per-task scores (the report's plots use them).
    """
    out: dict[str, dict[str, Any]] = {}
    seeds = list(seeds)
    n_items = ds.manifest["counts"]["items"]
    for scenario in scenarios:
        given = learner
        if learner is not None and not model_fits(ds, cfg.train.scenario, scenario):
            log(
                f"{scenario}: the model (trained on {cfg.train.scenario}) saw ratings this "
                f"scenario holds out; meta-training {scenario} in process per seed instead"
            )
            given = None
        test = from_table(ds.tasks(scenario, "test"))
        runs = []
        for s in seeds:
            fitted = fit_methods(
                apply_overrides(cfg, seed=s),
                ds,
                scenario,
                tuple(baselines),
                log=log,
                learner=given,
                extra=extra,
            )
            per_task = {
                m: score_tasks(sc, test, n_items, desc=f"{scenario} seed {s}: {m}")
                for m, sc in fitted.scorers.items()
            }
            runs.append({m: mean_metrics(v) for m, v in per_task.items()})
            if on_seed is not None:
                on_seed(SeedScores(fitted, test, per_task))
        out[scenario] = {m: _aggregate([r[m] for r in runs]) for m in runs[0]}
        out[scenario][cfg.meta.algorithm]["source"] = "model" if given is not None else "fit"
    return out


def _aggregate(per_seed: list[dict[str, float]]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    std: dict[str, float] = {}
    for k in REPORTED:
        vals = torch.tensor([r[k] for r in per_seed], dtype=torch.float64)
        row[k] = float(vals.mean())
        std[k] = float(vals.std(unbiased=False)) if len(vals) > 1 else 0.0
    row["std"] = std
    row["per_seed"] = {k: [r[k] for r in per_seed] for k in REPORTED}
    return row


def write_results(results: dict, out_dir: str | Path) -> Path:
    """Write ``OUT/results.json`` atomically."""
    return write_json_atomic(Path(out_dir) / "results.json", results)


def write_json_atomic(path: Path, data: Any) -> Path:
    """Write JSON via a temp file + rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; results are for everyone to read
    os.replace(tmp, path)
    return path


def format_table(
    results: dict, *, metrics: tuple[str, ...] = ("mae", "rmse", "ndcg@3", "p@5", "recall@10")
) -> str:
    """A plain-text table per scenario: mean ± std over seeds, best per column marked *."""
    lines = []
    for scenario, methods in results.items():
        lines.append(f"\n{scenario}")
        lines.append(f"{'method':<14}" + "".join(f"{m:>17}" for m in metrics))
        best = {
            m: (min if m in ("mae", "rmse") else max)(
                r[m] for r in methods.values() if not math.isnan(r[m])
            )
            for m in metrics
        }
        for name, r in methods.items():
            cells = [
                f"{r[m]:.4f}±{r['std'][m]:.4f}{'*' if r[m] == best[m] else ' '}" for m in metrics
            ]
            lines.append(f"{name:<14}" + "".join(f"{c:>17}" for c in cells))
    return "\n".join(lines)
