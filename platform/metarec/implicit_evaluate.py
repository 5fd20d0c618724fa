"""``metarec evaluate`` on implicit feedback: the implicit baselines, each tuned on
validation users, ranking the whole catalogue for test users they never saw.

Every test user is scored from their support items alone (support excluded from the
ranking, their query items the positives; no sampled negatives), and the best baseline
on validation NDCG@10 is the reference every other method is compared with, as a paired
difference over test users with a 95% bootstrap CI (``metarec.stats``). The meta-learner
joins this table when its implicit (BCE/BPR) inner and outer losses land; until then this
is the baseline table a shop would compare it with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metarec.batch import TaskBatch, from_table, item_marks
from metarec.data.prepared import PreparedDataset
from metarec.implicit_baselines import GRIDS, Popularity
from metarec.implicit_metrics import (
    coverage,
    implicit_metrics,
    popularity_percentile,
    topk_membership,
)
from metarec.stats import paired_differences, verdict

__all__ = [
    "IMPLICIT_BASELINES",
    "METRICS",
    "evaluate_implicit",
    "format_implicit",
    "score_implicit",
]

METRICS = ("hr@10", "ndcg@10", "recall@20", "mrr")  # compared with CIs
IMPLICIT_BASELINES = tuple(GRIDS)


def score_implicit(
    scorer: Any, tasks: TaskBatch, n_items: int, popularity_pct: Tensor, *, chunk: int = 256
) -> tuple[dict[str, Tensor], Tensor]:
    """Per-user metrics ``(T,)`` and, per item, ``sum over users of log(1 - P(in top 10))``
    (for coverage), scoring ``chunk`` users' whole catalogue at a time."""
    out: dict[str, list[Tensor]] = {}
    log_not_shown = torch.zeros(n_items, dtype=torch.float64)
    for lo in range(0, tasks.num_tasks, chunk):
        part = tasks.select(torch.arange(lo, min(lo + chunk, tasks.num_tasks)))
        scores = scorer.predict_items(part, torch.arange(n_items).expand(part.num_tasks, -1))
        exclude = item_marks(part.support_items, part.support_mask, n_items)
        positives = item_marks(part.query_items, part.query_mask, n_items) & ~exclude
        for k, v in implicit_metrics(scores, positives, exclude, popularity_pct).items():
            out.setdefault(k, []).append(v)
        log_not_shown += torch.log1p(-topk_membership(scores, exclude, 10)).sum(0)
    return {k: torch.cat(v) for k, v in out.items()}, log_not_shown


def evaluate_implicit(
    ds: PreparedDataset,
    *,
    scenarios: Sequence[str],
    baselines: Sequence[str],
    seed: int = 0,
    resamples: int = 2000,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """``{scenario: {method: {metric: mean, "params": ..}, "_paired": {...}}}``."""
    n_items = ds.manifest["counts"]["items"]
    results: dict[str, dict[str, Any]] = {}
    for scenario in scenarios:
        train, valid, test = (from_table(ds.tasks(scenario, s)) for s in ("train", "valid", "test"))
        pct = popularity_percentile(Popularity().fit(train, n_items=n_items).counts_)
        rows: dict[str, Any] = {}
        per_user: dict[str, dict[str, np.ndarray]] = {}
        for name in baselines:
            cls, grid = GRIDS[name]
            params = [hp | ({"seed": seed} if "seed" in cls().get_params() else {}) for hp in grid]
            valid_ndcg = []
            for hp in params:
                fitted = cls(**hp).fit(train, n_items=n_items)
                m, _ = score_implicit(fitted, valid, n_items, pct)
                valid_ndcg.append(float(torch.nanmean(m["ndcg@10"].double())))
            best = params[int(np.argmax(valid_ndcg))]
            m, log_not_shown = score_implicit(
                cls(**best).fit(train, n_items=n_items), test, n_items, pct
            )
            rows[name] = {k: float(torch.nanmean(v.double())) for k, v in m.items()}
            rows[name] |= {"coverage@10": coverage(log_not_shown), "params": best}
            rows[name]["valid_ndcg@10"] = max(valid_ndcg)
            per_user[name] = {k: v.double().numpy() for k, v in m.items()}
            log(f"[{scenario}] {name}: test ndcg@10 {rows[name]['ndcg@10']:.4f} ({best})")
        reference = max(rows, key=lambda n: rows[n]["valid_ndcg@10"])
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
