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
from pathlib import Path
from typing import Any, Protocol

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
    "AdaptedScorer",
    "evaluate",
    "format_table",
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


def score(scorer: Scorer, tasks: TaskBatch, n_items: int) -> dict[str, float]:
    """Query metrics and full-catalogue ranking metrics, averaged over tasks."""
    pred = scorer.predict_items(tasks, tasks.query_items)
    metrics = query_metrics(pred.double(), tasks.query_ratings.double(), tasks.query_mask)
    catalog = torch.arange(n_items).expand(tasks.num_tasks, n_items)
    scores = scorer.predict_items(tasks, catalog)
    rows = torch.arange(tasks.num_tasks)[:, None]
    exclude = torch.zeros(tasks.num_tasks, n_items, dtype=torch.bool)
    exclude[
        rows.expand_as(tasks.support_items)[tasks.support_mask],
        tasks.support_items[tasks.support_mask],
    ] = True
    positives = torch.zeros_like(exclude)
    relevant = tasks.query_mask & (tasks.query_ratings >= 4.0)
    positives[rows.expand_as(tasks.query_items)[relevant], tasks.query_items[relevant]] = True
    metrics |= catalog_metrics(scores.double(), positives, exclude, k=10)
    return mean_metrics(metrics)


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


def _run_seed(
    cfg: MetarecConfig,
    ds: PreparedDataset,
    scenario: str,
    baselines: tuple[str, ...],
    log: Callable[[str], None],
    learner: MetaLearner | None = None,
) -> dict[str, dict]:
    train, valid, test = (from_table(ds.tasks(scenario, s)) for s in ("train", "valid", "test"))
    n_items = ds.manifest["counts"]["items"]
    results: dict[str, dict] = {}
    method = cfg.meta.algorithm
    if learner is None:
        log(f"[seed {cfg.seed}] meta-training {method} on {scenario}")
        learner = _fit_with_bar(cfg, ds, scenario, f"{method} seed {cfg.seed}").learner
    results[method] = score(AdaptedScorer(learner), test, n_items)
    grids = classic_baselines(seed=cfg.seed)
    for name in (b for b in baselines if b in grids):
        g = grids[name]
        scorer = _tuned(lambda hp, g=g: g.cls(**hp).fit(train, n_items=n_items), g.grid, valid)
        results[name] = score(scorer, test, n_items)
    if {"global_model", "finetune"} & set(baselines):
        log(f"[seed {cfg.seed}] training the global model (no adaptation)")
        plain = apply_overrides(cfg, **{"meta.inner_steps": 0, "meta.algorithm": "fomaml"})
        glob = _fit_with_bar(plain, ds, scenario, f"global model seed {cfg.seed}").learner
        glob.cfg = cfg.meta  # adapt the same parameter group as the meta-learner
        glob.adapted = learner.adapted
        if "global_model" in baselines:
            results["global_model"] = score(AdaptedScorer(glob, steps=0), test, n_items)
        if "finetune" in baselines:
            lrs = sorted({*FINETUNE_LRS, cfg.meta.inner_lr})
            scorer = _tuned(
                lambda hp: AdaptedScorer(glob, inner_lr=hp["lr"]), [{"lr": lr} for lr in lrs], valid
            )
            results["finetune"] = score(scorer, test, n_items)
    return results


def evaluate(
    cfg: MetarecConfig,
    ds: PreparedDataset,
    *,
    scenarios: Iterable[str],
    seeds: Iterable[int],
    baselines: Iterable[str] = BASELINES,
    log: Callable[[str], None] = lambda _: None,
    learner: MetaLearner | None = None,
) -> dict[str, dict[str, Any]]:
    """``{scenario: {method: {metric: mean, "std": {...}, "per_seed": {...}}}}``.

    Args:
        learner: a trained model (``--model``) to score instead of meta-training one per
            seed; seeds then vary only the baselines that train (MF, global model).
    """
    out: dict[str, dict[str, Any]] = {}
    seeds = list(seeds)
    for scenario in scenarios:
        runs = [
            _run_seed(apply_overrides(cfg, seed=s), ds, scenario, tuple(baselines), log, learner)
            for s in seeds
        ]
        out[scenario] = {m: _aggregate([r[m] for r in runs]) for m in runs[0]}
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
