"""``metarec evaluate`` on implicit feedback: the meta-learner and the implicit baselines,
each tuned on validation users, ranking the whole catalogue for test users they never saw.

Every test user is scored from their support items alone (support excluded from the
ranking, their query items the positives; no sampled negatives), and the best baseline
on validation NDCG@10 is the reference every other method is compared with, as a paired
difference over test users with a 95% bootstrap CI (``metarec.stats``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from metarec.batch import TaskBatch, from_table
from metarec.config import MetarecConfig
from metarec.data.prepared import PreparedDataset
from metarec.implicit_baselines import GRIDS, Popularity
from metarec.implicit_metrics import (
    coverage,
    popularity_percentile,
    score_implicit,
)
from metarec.meta import MetaLearner
from metarec.stats import paired_differences, verdict

__all__ = [
    "IMPLICIT_BASELINES",
    "METRICS",
    "ImplicitSplit",
    "evaluate_implicit",
    "format_implicit",
]

METRICS = ("hr@10", "ndcg@10", "recall@20", "mrr")  # compared with CIs
# the same network without adaptation, and fine-tuned (``evaluate.fit_methods``)
NETWORK_BASELINES = ("global_model", "finetune")
IMPLICIT_BASELINES = (*GRIDS, *NETWORK_BASELINES)


@dataclass(frozen=True)
class ImplicitSplit:
    """One user split's fitted and tuned scorers, for a hook that measures more with them
    (``metarec report``'s curves): the test users before any support cut."""

    scenario: str
    split: int | str
    method: str  # the meta-learner's name among ``scorers``
    scorers: dict[str, Any]
    test: TaskBatch
    n_items: int
    popularity_pct: torch.Tensor
    per_user: dict[str, dict[str, np.ndarray]]  # method -> metric -> (T,) at the evaluated cut
    history: list[dict[str, float]] | None


def evaluate_implicit(
    cfg: MetarecConfig,
    ds: PreparedDataset,
    *,
    scenarios: Sequence[str],
    baselines: Sequence[str],
    splits: Sequence[tuple[int | str, PreparedDataset]] | None = None,
    resamples: int = 2000,
    log: Callable[[str], None] = print,
    learner: MetaLearner | None = None,
    on_split: Callable[[ImplicitSplit], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """``{scenario: {method: {metric: mean, "per_split": [...], "params": [...]},
    "_paired": {...}, "_protocol": {...}}}``.

    ``learner``: a trained model (``--model``, trained on ``cfg.train.scenario`` of ``ds``)
    scored instead of meta-training one wherever it fits (``evaluate.model_fits``: it saw
    none of that split's held-out interactions); the meta row's ``"source"`` says, per
    split, ``model`` or ``fit``.

    On every user split (``splits``, default the prepared one): the meta-learner (``cfg``,
    meta-trained here with its implicit loss, its test-time adaptation chosen on validation
    NDCG@10) and the ``network`` baselines come from ``evaluate.fit_methods``, the same as
    on ratings; the implicit baselines are tuned on validation NDCG@10 over their
    ``GRIDS``. With ``evaluate.max_support`` validation and test users adapt on that many
    support interactions (``TaskBatch.cut_support``). A method's figure is the mean over
    splits of its mean over test users; the reference every method is compared with is the
    best *baseline* on validation users (summed over splits), and paired differences pool
    every test user of every split (users resampled within splits). ``on_split`` is called
    with each split's scorers once they are scored.
    """
    from metarec.evaluate import model_fits

    splits = list(splits) if splits else [(ds.manifest["protocol"]["seed"], ds)]
    cut = cfg.evaluate.max_support
    results: dict[str, dict[str, Any]] = {}
    for scenario in scenarios:
        per_split = []
        sources = []
        for label, view in splits:
            log(f"[{scenario}] split {label}")
            given = learner
            if learner is not None and not model_fits(ds, cfg.train.scenario, scenario, view):
                log(f"[{scenario}] split {label}: the model saw held-out interactions; fitting")
                given = None
            sources.append("model" if given is not None else "fit")
            scores = _split_scores(cfg, view, scenario, baselines, cut, log, given, on_split, label)
            per_split.append(scores)
        methods = list(per_split[0])
        method = next(n for n in methods if per_split[0][n]["meta"])
        rows: dict[str, Any] = {}
        for name in methods:
            runs = [s[name] for s in per_split]
            rows[name] = {
                k: float(np.mean([r["means"][k] for r in runs])) for k in runs[0]["means"]
            }
            rows[name] |= {
                "valid_ndcg@10": float(np.mean([r["valid"] for r in runs])),
                "per_split": [r["means"] for r in runs],
                "params": [r["params"] for r in runs],
            }
            if runs[0]["history"] is not None:
                rows[name]["history"] = [r["history"] for r in runs]
        rows[method]["source"] = sources
        candidates = [n for n in methods if n != method] or methods
        reference = max(candidates, key=lambda n: rows[n]["valid_ndcg@10"])
        pooled = {n: [s[n]["per_user"] for s in per_split] for n in methods}
        rows["_paired"] = {
            "reference": reference,
            **{
                name: paired_differences(
                    pooled[name], pooled[reference], METRICS, resamples=resamples, seed=cfg.seed
                )
                for name in methods
                if name != reference
            },
        }
        rows["_paired_meta"] = {  # the meta-learner against each method by name
            "method": method,
            **{
                name: paired_differences(
                    pooled[method], pooled[name], METRICS, resamples=resamples, seed=cfg.seed
                )
                for name in methods
                if name != method
            },
        }
        rows["_protocol"] = {
            "test_users": sum(s[method]["users"] for s in per_split),
            "splits": [label for label, _ in splits],
            "items": ds.manifest["counts"]["items"],
            "support": f"at most {cut} interactions" if cut else "every support interaction",
            "positives": "every query interaction",
            "excluded": "support items" + (" and the rest of the user's history" if cut else ""),
            "negatives": "the whole catalogue (no sampling)",
            "reference": "the best baseline on validation NDCG@10",
        }
        results[scenario] = rows
    return results


def _split_scores(
    cfg: MetarecConfig,
    ds: PreparedDataset,
    scenario: str,
    baselines: Sequence[str],
    cut: int | None,
    log: Callable[[str], None],
    learner: MetaLearner | None = None,
    on_split: Callable[[ImplicitSplit], None] | None = None,
    label: int | str = 0,
) -> dict[str, dict[str, Any]]:
    """Every method fitted and tuned on one split (the meta-learner unless ``learner`` is
    given), and its test users' metrics."""
    from metarec.evaluate import fit_methods, tuned, tuning_users, valid_objective_for

    n_items = ds.manifest["counts"]["items"]
    train, valid, whole = (from_table(ds.tasks(scenario, s)) for s in ("train", "valid", "test"))
    test = whole
    if cut:
        valid, test = valid.cut_support(cut), whole.cut_support(cut)
    valid = tuning_users(cfg, valid)  # the sample fit_methods chooses on (it is one)
    pct = popularity_percentile(Popularity().fit(train, n_items=n_items).counts_)
    objective = valid_objective_for(ds)
    scorers: dict[str, tuple[Any, dict[str, Any], float]] = {}  # scorer, params, valid
    for name in (b for b in baselines if b in GRIDS):
        cls, grid = GRIDS[name]
        params = [hp | ({"seed": cfg.seed} if "seed" in cls().get_params() else {}) for hp in grid]
        fit = lambda hp, cls=cls: cls(**hp).fit(train, n_items=n_items)  # noqa: E731
        best, hp, value = tuned(fit, params, valid, objective)
        scorers[name] = (best, hp, 1.0 - value)
    network = tuple(b for b in baselines if b in NETWORK_BASELINES)
    fitted = fit_methods(cfg, ds, scenario, network, log=log, valid=valid, learner=learner)
    for name, scorer in fitted.scorers.items():
        knobs = fitted.adapt if name == fitted.method else {}
        scorers[name] = (scorer, knobs, 1.0 - objective(scorer, valid))
    out: dict[str, dict[str, Any]] = {}
    for name, (scorer, params, valid_value) in scorers.items():
        m, log_not_shown = score_implicit(scorer, test, n_items, pct)
        means = {k: float(torch.nanmean(v.double())) for k, v in m.items()}
        means["coverage@10"] = coverage(log_not_shown)
        out[name] = {
            "means": means,
            "params": params,
            "valid": valid_value,
            "per_user": {k: v.double().numpy() for k, v in m.items()},
            "users": test.num_tasks,
            "meta": name == fitted.method,
            "history": fitted.history if name == fitted.method else None,
        }
        log(f"[{scenario}] {name}: test ndcg@10 {means['ndcg@10']:.4f} ({params})")
    if on_split is not None:
        on_split(
            ImplicitSplit(
                scenario=scenario,
                split=label,
                method=fitted.method,
                scorers={name: scorer for name, (scorer, _, _) in scorers.items()},
                test=whole,
                n_items=n_items,
                popularity_pct=pct,
                per_user={name: o["per_user"] for name, o in out.items()},
                history=fitted.history,
            )
        )
    return out


def format_implicit(results: dict[str, dict[str, Any]]) -> str:
    """Per scenario: each method's means, then its paired difference from the reference
    (the best on validation NDCG@10), win/loss only where the CI excludes 0."""
    from metarec.results import method_rows, pipe_table

    lines: list[str] = []
    for scenario, rows in results.items():
        paired, meta = rows["_paired"], rows.get("_paired_meta", {})
        header = ["method", *METRICS, "coverage@10", "pop_pct@10"]
        body = []
        for name, r in method_rows(rows).items():
            cells = [f"{r[m]:.4f}" for m in (*METRICS, "coverage@10")] + [f"{r['pop_pct@10']:.1f}"]
            body.append([name + (" (reference)" if name == paired["reference"] else ""), *cells])
        p = rows["_protocol"]
        lines += [
            f"{scenario} ({p['test_users']} test users over {len(p['splits'])} split(s); "
            f"support: {p['support']})",
            *pipe_table(header, body),
        ]
        lines.append(
            f"\nminus {paired['reference']}: diff [95% CI], win/loss only if the CI excludes 0"
        )
        lines += _diff_lines({k: v for k, v in paired.items() if k != "reference"})
        if meta:
            lines.append(f"\n{meta['method']} minus each method:")
            lines += _diff_lines({k: v for k, v in meta.items() if k != "method"})
        lines.append("")
    return "\n".join(lines)


def _diff_lines(pairs: dict[str, dict[str, Any]]) -> list[str]:
    """One line per method: each metric's difference, CI and W/L/T verdict."""
    lines = []
    for name, diffs in pairs.items():
        cells = [
            f"{d['diff']:+.4f} [{d['ci95'][0]:+.3f},{d['ci95'][1]:+.3f}] "
            f"{verdict(m, d['diff'], d['ci95'])[0].upper()}"
            for m, d in diffs.items()
        ]
        lines.append(
            f"{name:<12} " + "  ".join(f"{m} {c}" for m, c in zip(METRICS, cells, strict=True))
        )
    return lines
