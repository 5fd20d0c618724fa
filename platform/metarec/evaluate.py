"""Scenario x method evaluation: the meta-learner against every baseline, over user splits.

Every method is a *scorer*: given evaluation tasks and items, it returns ratings using only
each task's support set. The meta-learner and the fine-tuned global model score through the
same ``meta.adapt`` that serving uses, so what is measured here is what a user gets.
Everything that is chosen is chosen on validation users: the baselines' hyperparameters
(grids in ``baselines``) and the meta-learner's test-time adaptation (``adaptation_grid``).
Test users only ever get scored. Differences are paired per user and carry a bootstrap CI
(``metarec.stats``), so a win is claimed only where the CI excludes zero.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from metarec.baselines import Grid, MFFoldIn, classic_baselines
from metarec.batch import TaskBatch, Tasks, from_table, item_marks, ragged_from_table
from metarec.config import MetarecConfig, apply_overrides
from metarec.data.prepared import PreparedDataset
from metarec.implicit_metrics import valid_ndcg
from metarec.loop import FitResult, fit, valid_key
from metarec.meta import MetaLearner
from metarec.metrics import catalog_metrics, masked_mae, mean_metrics, query_metrics
from metarec.mf import MF_GRID_MAX_RATINGS, choose_mf, users_for_grid
from metarec.scorers import AdaptedScorer, Scorer, adaptation_grid, relevance_threshold
from metarec.stats import paired_differences

__all__ = [
    "BASELINES",
    "REPORTED",
    "ScoreMethods",
    "SeedFit",
    "SeedScores",
    "Split",
    "evaluate",
    "fit_methods",
    "fit_with_bar",
    "model_fits",
    "score_chunk",
    "score_methods",
    "score_tasks",
    "tuned",
    "tuned_fit",
    "tuning_users",
    "valid_objective_for",
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


def score_tasks(
    scorer: Scorer,
    tasks: TaskBatch,
    n_items: int | None = None,
    *,
    relevance_threshold: float,
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
            for k, v in score_chunk(scorer, part, n_items, relevance_threshold).items():
                out.setdefault(k, []).append(v)
            bar.update(part.num_tasks)
    return {k: torch.cat(v) for k, v in out.items()}


def score_chunk(
    scorer: Scorer, tasks: TaskBatch, n_items: int | None, threshold: float
) -> dict[str, Tensor]:
    """One chunk of ``score_tasks``: every user of ``tasks`` scored at once."""
    pred = scorer.predict_items(tasks, tasks.query_items)
    metrics = query_metrics(
        pred.double(),
        tasks.query_ratings.double(),
        tasks.query_mask,
        relevance_threshold=threshold,
    )
    if n_items is None:
        return metrics
    catalog = torch.arange(n_items).expand(tasks.num_tasks, n_items)
    scores = scorer.predict_items(tasks, catalog)  # (T, I)
    exclude = item_marks(tasks.support_items, tasks.support_mask, n_items)
    relevant = tasks.query_mask & (tasks.query_ratings >= threshold)
    positives = item_marks(tasks.query_items, relevant, n_items)
    return metrics | catalog_metrics(scores.double(), positives, exclude, k=10)


# Every method's per-task metrics on a split's test tasks, given padded and as their Arrow
# table: in this process (``score_methods``, which reads the padded ones), or spread over
# Ray workers by a shell (``ray_scoring``, which ships the table).
ScoreMethods = Callable[..., dict[str, dict[str, Tensor]]]


def score_methods(
    scorers: dict[str, Scorer],
    tasks: TaskBatch,
    table: Any = None,
    *,
    n_items: int,
    relevance_threshold: float,
    desc: str = "",
) -> dict[str, dict[str, Tensor]]:
    """``{method: score_tasks(...)}`` over the test ``tasks``, in this process (``table``,
    the same tasks as Arrow, is for scorers that ship them elsewhere)."""
    return {
        m: score_tasks(
            sc, tasks, n_items, relevance_threshold=relevance_threshold, desc=f"{desc}: {m}"
        )
        for m, sc in scorers.items()
    }


Objective = Callable[[Scorer, TaskBatch], float]  # lower is better


def _valid_mae(scorer: Scorer, valid: TaskBatch) -> float:
    return masked_mae(scorer.predict_items(valid, valid.query_items), valid)


def valid_objective_for(ds: PreparedDataset) -> Objective:
    """What methods are chosen by on validation users: query MAE on ratings, 1 - NDCG@10
    of the full-catalogue ranking on implicit data."""
    if ds.feedback == "explicit":
        return _valid_mae
    n_items = ds.manifest["counts"]["items"]
    return lambda scorer, valid: 1.0 - valid_ndcg(scorer, valid, n_items)


def tuned(
    make: Callable[[dict], Scorer],
    grid: Iterable[dict],
    valid: TaskBatch,
    objective: Objective = _valid_mae,
) -> tuple[Scorer, dict, float]:
    """The scorer of the grid point with the lowest validation ``objective`` (first one on
    ties), its grid point and that value."""
    best: tuple[float, Scorer, dict] | None = None
    for hp in grid:
        scorer = make(hp)
        value = objective(scorer, valid)
        if best is None or value < best[0]:
            best = (value, scorer, hp)
    assert best is not None
    return best[1], best[2], best[0]


def tuning_users(cfg: MetarecConfig, valid: TaskBatch) -> TaskBatch:
    """The validation users every choice is made on: all of them up to
    ``evaluate.tune_ratings`` ratings in all, else a random sample (per init seed) holding
    at most that many, as MF's grid compares on a sample of training users. The one place
    ratings and implicit evaluation draw it."""
    if cfg.evaluate.tune_ratings is None:
        return valid
    return users_for_grid(valid, cfg.evaluate.tune_ratings, cfg.seed)


def tuned_fit(
    grid: Grid,
    train: Tasks,
    valid: TaskBatch,
    n_items: int,
    *,
    seed: int = 0,
    max_ratings: int = MF_GRID_MAX_RATINGS,
) -> Scorer:
    """``grid``'s estimator at the point with the lowest validation MAE, fitted on every
    training user. As for MF's grid (``mf.choose_mf``), the points are compared on
    ``users_for_grid(train, max_ratings, seed)``: all of ``train`` up to that size, so only
    larger data is chosen on a sample (the bias model's twelve points are twelve ALS-like
    fits over every rating otherwise)."""
    sample = users_for_grid(train, max_ratings, seed) if len(grid.grid) > 1 else train
    best, hp, _ = tuned(lambda hp: grid.cls(**hp).fit(sample, n_items=n_items), grid.grid, valid)
    return best if sample is train else grid.cls(**hp).fit(train, n_items=n_items)


def fit_with_bar(
    cfg: MetarecConfig,
    ds: PreparedDataset,
    scenario: str,
    desc: str,
    tuned_mf: MFFoldIn | None = None,
) -> FitResult:
    """``fit`` with an epoch progress bar (terminals only: logs stay clean)."""
    with tqdm(total=cfg.train.epochs, desc=desc, unit="epoch", disable=None, leave=False) as bar:

        def progress(row: dict[str, float]) -> None:
            bar.update(1)
            key = next(k for k in row if k.startswith("valid/"))
            bar.set_postfix({key: f"{row[key]:.4f}"})

        return fit(cfg, ds, scenario=scenario, progress=progress, tuned_mf=tuned_mf)


@dataclass
class SeedFit:
    """Every method of one (scenario, split, seed), trained and tuned, ready to score test
    users.

    ``history`` is the meta-learner's learning curve when it was trained here (None when a
    given model was scored); ``adapt`` the test-time knobs chosen on validation users.
    """

    scenario: str
    seed: int
    method: str  # the meta-learner's name (its algorithm)
    scorers: dict[str, Scorer]
    history: list[dict[str, float]] | None = None
    adapt: dict[str, Any] = field(default_factory=dict)


def fit_methods(
    cfg: MetarecConfig,
    ds: PreparedDataset,
    scenario: str,
    baselines: tuple[str, ...],
    *,
    log: Callable[[str], None] = lambda _: None,
    learner: MetaLearner | None = None,
    extra: dict[str, Scorer] | None = None,
    tune_adaptation: bool = True,
    valid: TaskBatch | None = None,
) -> SeedFit:
    """Meta-train (unless ``learner`` is given) and tune every baseline for ``cfg.seed``.

    Args:
        extra: scorers built elsewhere (a transferred model), scored like the rest.
        tune_adaptation: choose the meta-learner's test-time steps, step size and support
            prior on validation users (``adaptation_grid``); else score the trained ones.
        valid: the validation tasks everything here is chosen on (default: the split's;
            implicit evaluation passes them cut to ``evaluate.max_support``), or the
            sample of them ``evaluate.tune_ratings`` allows. Early stopping always
            validates on the split's own, all of them.
    """
    train = ragged_from_table(ds.tasks(scenario, "train"))  # flat: baselines read ratings
    if valid is None:
        valid = from_table(ds.tasks(scenario, "valid"))
    valid = tuning_users(cfg, valid)
    n_items = ds.manifest["counts"]["items"]
    method = cfg.meta.algorithm
    history = None
    grids = classic_baselines(seed=cfg.seed)
    classic = {  # first: the networks start from the tuned mf_foldin's items (no refit)
        name: choose_mf(train, valid, n_items, seed=cfg.seed)
        if name == "mf_foldin"  # it keeps every point's MAE (build_learner reads them)
        else tuned_fit(grids[name], train, valid, n_items, seed=cfg.seed)
        for name in baselines
        if name in grids
    }
    mf = classic.get("mf_foldin")
    tuned_mf = mf if isinstance(mf, MFFoldIn) else None
    if learner is None:
        log(f"[seed {cfg.seed}] meta-training {method} on {scenario}")
        fitted = fit_with_bar(cfg, ds, scenario, f"{method} seed {cfg.seed}", tuned_mf)
        learner, history = fitted.learner, fitted.history
    grid = adaptation_grid(learner.cfg, learner.feedback) if tune_adaptation else [{}]
    objective = valid_objective_for(ds)
    meta, _, value = tuned(lambda hp: AdaptedScorer(learner, **hp), grid, valid, objective)
    assert isinstance(meta, AdaptedScorer)
    key = valid_key(ds.feedback).replace("/", "_")  # valid_mae on ratings
    adapt = {**meta.knobs(), key: value, "grid_points": len(grid)}
    scorers: dict[str, Scorer] = {method: meta, **(extra or {}), **classic}
    if {"global_model", "finetune"} & set(baselines):
        log(f"[seed {cfg.seed}] training the global model (no adaptation)")
        plain = apply_overrides(cfg, **{"meta.inner_steps": 0, "meta.algorithm": "fomaml"})
        desc = f"global model seed {cfg.seed}"
        glob = fit_with_bar(plain, ds, scenario, desc, tuned_mf).learner
        glob.cfg = cfg.meta  # adapt the same parameter group as the meta-learner
        glob.adapted = learner.adapted
        if "global_model" in baselines:
            scorers["global_model"] = AdaptedScorer(glob, steps=0)
        if "finetune" in baselines:
            if cfg.meta.inner_solver == "ridge":  # fold the head in under the untrained prior
                grid = adaptation_grid(cfg.meta, ds.feedback)
            else:
                grid = [{"inner_lr": lr} for lr in sorted({*FINETUNE_LRS, cfg.meta.inner_lr})]
            scorers["finetune"] = tuned(
                lambda hp: AdaptedScorer(glob, **hp), grid, valid, objective
            )[0]
    return SeedFit(scenario, cfg.seed, method, scorers, history, adapt)


def _train_pairs(ds: PreparedDataset, scenario: str) -> np.ndarray:
    """Sorted unique ``user * n_items + item`` of every rating in a scenario's train split."""
    train = ragged_from_table(ds.tasks(scenario, "train"))
    rows, items, _ = train.flat()
    n_items = ds.manifest["counts"]["items"]
    keys = train.users[rows] * n_items + items
    return np.unique(keys.numpy())


def model_fits(
    ds: PreparedDataset, trained_on: str, scenario: str, target: PreparedDataset | None = None
) -> bool:
    """Whether a model trained on ``ds``'s ``trained_on`` may be scored on the test users
    of ``target``'s (default ``ds``) ``scenario``.

    Only if it saw no rating that ``scenario``'s own training may not: scenarios share a
    user split, but e.g. ``warm`` and ``item_cold`` hold out ratings of *training* users
    (and new items) that ``user_cold`` trains on, so a ``user_cold`` model scored there
    would be tested on ratings it learned from. ``user_cold`` and ``temporal`` train on
    the same ratings; a ``warm`` model fits ``user_cold`` (it saw less). Another user split
    (``--split-seeds``) puts some of its training users in test: it never fits there.
    """
    target = ds if target is None else target
    if target is ds and trained_on == scenario:
        return True
    if trained_on not in ds.scenarios or scenario not in target.scenarios:
        return False
    return bool(np.isin(_train_pairs(ds, trained_on), _train_pairs(target, scenario)).all())


@dataclass
class SeedScores:
    """One seed's per-task test metrics of every method (what a report's plots need)."""

    fit: SeedFit
    test: TaskBatch
    per_task: dict[str, dict[str, Tensor]]  # method -> metric -> (T,)
    relevance_threshold: float
    split: int | str = 0


Split = tuple[int | str, PreparedDataset]  # (split seed or file name, the dataset so split)


def evaluate(
    cfg: MetarecConfig,
    ds: PreparedDataset,
    *,
    scenarios: Iterable[str],
    seeds: Iterable[int],
    splits: Sequence[Split] | None = None,
    baselines: Iterable[str] = BASELINES,
    log: Callable[[str], None] = lambda _: None,
    learner: MetaLearner | None = None,
    extra: dict[str, Scorer] | None = None,
    on_seed: Callable[[SeedScores], None] | None = None,
    threshold: float | None = None,
    tune_adaptation: bool = True,
    resamples: int = 2000,
    score: ScoreMethods = score_methods,
) -> dict[str, dict[str, Any]]:
    """``{scenario: {method: {metric: mean, "std": {...}, "per_split": {...}},
    "_paired": {...}, "_protocol": {...}}}``.

    Every split (``splits``; default: the prepared one) trains and tunes every method for
    every init seed in ``seeds`` and scores its test users. Per user, metrics are averaged
    over init seeds; a split's value is the mean over its users (RMSE pooled over its query
    ratings); the reported mean and sample std (ddof=1) are over splits (over init seeds
    when there is one split). ``_paired`` compares each meta method (the meta-learner, a
    transferred model) with each other method: the difference pooled over every test user
    of every split, with a 95% bootstrap CI (users resampled within splits).

    Args:
        learner: a trained model (``--model``) to score instead of meta-training one per
            seed. It is scored only where it fits (``model_fits``: its own split and
            scenarios whose held-out ratings it never saw); elsewhere the meta-learner is
            trained in process with its config. The row's ``"source"`` says which.
        extra: more scorers to score on every scenario and seed (a transferred model).
        on_seed: called with each seed's per-task scores (the report's plots use them).
        threshold: relevance threshold (default ``relevance_threshold(manifest)``).
        tune_adaptation: see ``fit_methods``.
        resamples: bootstrap resamples of the paired CIs.
        score: how the test users are scored (``score_methods``'s signature): in this
            process by default; the CLI's ``--workers`` passes Ray Data workers.
    """
    out: dict[str, dict[str, Any]] = {}
    seeds = list(seeds)
    splits = list(splits) if splits else [(ds.manifest["protocol"]["seed"], ds)]
    threshold = relevance_threshold(ds.manifest) if threshold is None else threshold
    n_items = ds.manifest["counts"]["items"]
    method = cfg.meta.algorithm
    eta = _Eta(len(scenarios) * len(splits) * len(seeds), log)
    for scenario in scenarios:
        per_split, seed_means, sources, fits = [], [], [], []
        for label, view in splits:
            given = learner
            if learner is not None and not model_fits(ds, cfg.train.scenario, scenario, view):
                log(
                    f"{scenario} split {label}: the model (trained on {cfg.train.scenario} of "
                    f"split {ds.manifest['protocol']['seed']}) saw ratings this split holds "
                    "out; meta-training in process per seed instead"
                )
                given = None
            sources.append("model" if given is not None else "fit")
            table = view.tasks(scenario, "test")
            test = from_table(table)
            runs = []
            for s in seeds:
                fitted = fit_methods(
                    apply_overrides(cfg, seed=s),
                    view,
                    scenario,
                    tuple(baselines),
                    log=log,
                    learner=given,
                    extra=extra,
                    tune_adaptation=tune_adaptation,
                )
                per_task = score(
                    fitted.scorers,
                    test,
                    table,
                    n_items=n_items,
                    relevance_threshold=threshold,
                    desc=f"{scenario} split {label} seed {s}",
                )
                runs.append(per_task)
                fits.append({"split": label, "seed": s, **fitted.adapt})
                if on_seed is not None:
                    on_seed(SeedScores(fitted, test, per_task, threshold, label))
                eta.step(f"{scenario} split {label} seed {s}")
            seed_means.append([{m: mean_metrics(v) for m, v in r.items()} for r in runs])
            per_split.append(users_over_seeds(runs))
        rows = _aggregate(per_split, seed_means)
        rows[method]["source"] = sources[0] if len(set(sources)) == 1 else "model+fit"
        metas = [m for m in rows if m == method or m in (extra or {})]
        rows["_paired"] = {
            a: {
                b: paired_differences(
                    [p[a] for p in per_split],
                    [p[b] for p in per_split],
                    REPORTED,
                    resamples=resamples,
                )
                for b in rows
                if b != a and not b.startswith("_")
            }
            for a in metas
        }
        rows["_protocol"] = {
            "split_seeds": [label for label, _ in splits],
            "init_seeds": seeds,
            "std_over": "splits" if len(splits) > 1 else "init seeds",
            "test_users": [len(p[method]["mae"]) for p in per_split],
            "relevance_threshold": threshold,
            "tuned_on": "valid",
            "adapt": _modal_adapt(fits),
            "adapt_per_fit": fits,
            "meta_source_per_split": sources,
            "bootstrap": {"resamples": resamples, "seed": 0, "level": 0.95},
        }
        out[scenario] = rows
    return out


class _Eta:
    """One line per finished (scenario, split, seed) with the time left, extrapolated from
    the mean so far: an evaluation runs for minutes, and a log file shows no progress bar."""

    def __init__(self, total: int, log: Callable[[str], None]) -> None:
        self.total, self.done, self.log = total, 0, log
        self.start = time.perf_counter()

    def step(self, what: str) -> None:
        self.done += 1
        spent = time.perf_counter() - self.start
        left = spent / self.done * (self.total - self.done)
        tail = f", about {_duration(left)} left" if self.done < self.total else ""
        self.log(f"[{self.done}/{self.total}] {what} scored ({_duration(spent)} so far{tail})")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def users_over_seeds(runs: list[dict[str, dict[str, Tensor]]]) -> dict[str, dict[str, np.ndarray]]:
    """method -> metric -> (T,) per-user value averaged over init seeds (NaN stays NaN)."""
    return {
        m: {k: torch.stack([r[m][k] for r in runs]).double().mean(0).numpy() for k in runs[0][m]}
        for m in runs[0]
    }


def _aggregate(
    per_split: list[dict[str, dict[str, np.ndarray]]],
    seed_means: list[list[dict[str, dict[str, float]]]],
) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for m in per_split[0]:
        split_vals = [
            mean_metrics({k: torch.from_numpy(v) for k, v in p[m].items()}) for p in per_split
        ]
        # one split: the spread over init seeds is all there is
        spread = split_vals if len(per_split) > 1 else [r[m] for r in seed_means[0]]
        row: dict[str, Any] = {k: float(np.mean([v[k] for v in split_vals])) for k in REPORTED}
        row["std"] = {
            k: float(np.std([v[k] for v in spread], ddof=1)) if len(spread) > 1 else 0.0
            for k in REPORTED
        }
        row["per_split"] = {k: [v[k] for v in split_vals] for k in REPORTED}
        rows[m] = row
    return rows


def _modal_adapt(fits: list[dict[str, Any]]) -> dict[str, Any]:
    """The adaptation chosen most often over fits (each fit's choice is in adapt_per_fit):
    its knobs only, not the per-fit bookkeeping (split, seed, valid MAE, grid size)."""
    bookkeeping = {"split", "seed", "valid_mae", "grid_points"}
    counts = Counter(
        tuple(sorted((k, v) for k, v in f.items() if k not in bookkeeping)) for f in fits
    )
    return dict(counts.most_common(1)[0][0])
