"""``metarec evaluate`` on implicit feedback: the meta-learner and the implicit baselines,
each tuned on validation users, ranking the whole catalogue for test users they never saw.

Every test user is scored from their support items alone (support excluded from the
ranking, their query items the positives; no sampled negatives), and the best baseline
on validation NDCG@10 is the reference every other method is compared with, as a paired
difference over test users with a 95% bootstrap CI (``metarec.stats``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from metarec.batch import from_table
from metarec.config import MetarecConfig
from metarec.data.prepared import PreparedDataset
from metarec.implicit_baselines import GRIDS, Popularity
from metarec.implicit_metrics import (
    coverage,
    popularity_percentile,
    score_implicit,
    valid_ndcg,
)
from metarec.stats import paired_differences, verdict

__all__ = [
    "IMPLICIT_BASELINES",
    "METRICS",
    "evaluate_implicit",
    "format_implicit",
]

METRICS = ("hr@10", "ndcg@10", "recall@20", "mrr")  # compared with CIs
# the same network without adaptation, and fine-tuned (``evaluate.fit_methods``)
NETWORK_BASELINES = ("global_model", "finetune")
IMPLICIT_BASELINES = (*GRIDS, *NETWORK_BASELINES)


def evaluate_implicit(
    cfg: MetarecConfig,
    ds: PreparedDataset,
    *,
    scenarios: Sequence[str],
    baselines: Sequence[str],
    resamples: int = 2000,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """``{scenario: {method: {metric: mean, "params": ..}, "_paired": {...}}}``.

    The meta-learner (``cfg``, meta-trained here with its implicit loss, its test-time
    adaptation chosen on validation NDCG@10) and the ``network`` baselines come from
    ``evaluate.fit_methods``, the same as on ratings; the implicit baselines are tuned on
    validation NDCG@10 over their ``GRIDS``. The reference every method is compared with is
    the best *baseline* on validation users.
    """
    from metarec.evaluate import fit_methods, valid_objective_for

    n_items = ds.manifest["counts"]["items"]
    seed = cfg.seed
    results: dict[str, dict[str, Any]] = {}
    for scenario in scenarios:
        train, valid, test = (from_table(ds.tasks(scenario, s)) for s in ("train", "valid", "test"))
        pct = popularity_percentile(Popularity().fit(train, n_items=n_items).counts_)
        scorers: dict[str, tuple[Any, dict[str, Any], float]] = {}  # scorer, params, valid
        for name in (b for b in baselines if b in GRIDS):
            cls, grid = GRIDS[name]
            params = [hp | ({"seed": seed} if "seed" in cls().get_params() else {}) for hp in grid]
            fits = [cls(**hp).fit(train, n_items=n_items) for hp in params]
            values = [valid_ndcg(f, valid, n_items) for f in fits]
            best = int(np.argmax(values))
            scorers[name] = (fits[best], params[best], values[best])
        network = tuple(b for b in baselines if b in NETWORK_BASELINES)
        fitted = fit_methods(cfg, ds, scenario, network, log=log)
        objective = valid_objective_for(ds)
        for name, scorer in fitted.scorers.items():
            knobs = fitted.adapt if name == fitted.method else {}
            scorers[name] = (scorer, knobs, 1.0 - objective(scorer, valid))
        rows: dict[str, Any] = {}
        per_user: dict[str, dict[str, np.ndarray]] = {}
        for name, (scorer, params, valid_value) in scorers.items():
            m, log_not_shown = score_implicit(scorer, test, n_items, pct)
            rows[name] = {k: float(torch.nanmean(v.double())) for k, v in m.items()}
            rows[name] |= {"coverage@10": coverage(log_not_shown), "params": params}
            rows[name]["valid_ndcg@10"] = valid_value
            per_user[name] = {k: v.double().numpy() for k, v in m.items()}
            log(f"[{scenario}] {name}: test ndcg@10 {rows[name]['ndcg@10']:.4f} ({params})")
        if fitted.history is not None:
            rows[fitted.method]["history"] = fitted.history
        candidates = [n for n in rows if n != fitted.method] or list(rows)
        reference = max(candidates, key=lambda n: rows[n]["valid_ndcg@10"])
        rows["_paired"] = {
            "reference": reference,
            **{
                name: paired_differences(
                    [per_user[name]], [per_user[reference]], METRICS, resamples=resamples, seed=seed
                )
                for name in rows
                if name not in (reference, "_paired")
            },
        }
        rows["_protocol"] = {
            "test_users": test.num_tasks,
            "items": n_items,
            "positives": "every query interaction",
            "excluded": "support items",
            "negatives": "the whole catalogue (no sampling)",
            "reference": "the best baseline on validation NDCG@10",
        }
        results[scenario] = rows
    return results


def format_implicit(results: dict[str, dict[str, Any]]) -> str:
    """Per scenario: each method's means, then its paired difference from the reference
    (the best on validation NDCG@10), win/loss only where the CI excludes 0."""
    from metarec.results import method_rows, pipe_table

    lines: list[str] = []
    for scenario, rows in results.items():
        paired = rows["_paired"]
        header = ["method", *METRICS, "coverage@10", "pop_pct@10"]
        body = []
        for name, r in method_rows(rows).items():
            cells = [f"{r[m]:.4f}" for m in (*METRICS, "coverage@10")] + [f"{r['pop_pct@10']:.1f}"]
            body.append([name + (" (reference)" if name == paired["reference"] else ""), *cells])
        lines += [
            f"{scenario} ({rows['_protocol']['test_users']} test users)",
            *pipe_table(header, body),
        ]
        lines.append(
            f"\nminus {paired['reference']}: diff [95% CI], win/loss only if the CI excludes 0"
        )
        for name, diffs in paired.items():
            if name == "reference":
                continue
            cells = [
                f"{d['diff']:+.4f} [{d['ci95'][0]:+.3f},{d['ci95'][1]:+.3f}] "
                f"{verdict(m, d['diff'], d['ci95'])[0].upper()}"
                for m, d in diffs.items()
            ]
            lines.append(
                f"{name:<12} " + "  ".join(f"{m} {c}" for m, c in zip(METRICS, cells, strict=True))
            )
        lines.append("")
    return "\n".join(lines)
