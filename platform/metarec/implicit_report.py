"""`metarec report` on implicit feedback: the evaluation plus the curves people look at.

With the scorers each user split fitted and tuned (``evaluate_implicit(on_split=...)``):

- the **shot curve**: full-catalogue NDCG@10 and Recall@20 of test users who keep their
  first 0, 1, 2, 4, ... 32 support interactions (``TaskBatch.cut_support``, the cut
  ``evaluate.max_support`` makes: the rest of their history neither ranked nor a
  positive), with the meta-learner's paired difference from every other method and its
  95% CI at each size;
- **per-user NDCG@10** by activity (the user's whole support size) at the evaluated cut;
- the **learning curves** of the meta-training runs (validation 1 - NDCG@10).

The ridge head has no inner steps, so there is no step curve. The numbers go to
``curves.json`` beside ``results.json``; ``report.md`` shows the table, plots and CIs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from metarec.implicit_evaluate import ImplicitSplit, format_implicit
from metarec.implicit_metrics import score_implicit
from metarec.report import PLOTS, activity_buckets, shot_paired_markdown
from metarec.results import write_json_atomic, write_results, write_text_atomic
from metarec.stats import paired_differences

__all__ = ["SHOT_METRICS", "ImplicitCurves", "write_implicit_report"]

SHOT_METRICS = (("ndcg@10", "NDCG@10"), ("recall@20", "Recall@20"))
# BPR's fold-in is a refit on the training users plus the scored ones: one per support
# size would cost more than the rest of the report together.
NO_SHOT_CURVE = ("bpr",)


@dataclass
class _Scenario:
    method: str = ""
    # split -> method -> per shot -> metric -> (T,) per-user values
    shot_users: dict[Any, dict[str, list[dict[str, np.ndarray]]]] = field(default_factory=dict)
    user_ndcg: dict[str, list[np.ndarray]] = field(default_factory=dict)  # method -> splits
    support_size: list[np.ndarray] = field(default_factory=list)
    histories: list[dict[str, Any]] = field(default_factory=list)


class ImplicitCurves:
    """``evaluate_implicit``'s ``on_split`` hook: measures the curves with each split's
    fitted scorers (the shot sizes from ``report.shots``)."""

    def __init__(self, *, shots: Sequence[int]) -> None:
        self.shots = tuple(shots)
        self.by_scenario: dict[str, _Scenario] = {}

    def __call__(self, split: ImplicitSplit) -> None:
        cur = self.by_scenario.setdefault(split.scenario, _Scenario())
        cur.method = split.method
        cut = [split.test.cut_support(k) for k in self.shots]
        metrics = [k for k, _ in SHOT_METRICS]
        users: dict[str, list[dict[str, np.ndarray]]] = {}
        for name, scorer in split.scorers.items():
            if name not in NO_SHOT_CURVE:
                scored = (
                    score_implicit(scorer, t, split.n_items, split.popularity_pct)[0] for t in cut
                )
                users[name] = [{k: u[k].double().numpy() for k in metrics} for u in scored]
            cur.user_ndcg.setdefault(name, []).append(split.per_user[name]["ndcg@10"])
        cur.shot_users[split.split] = users
        cur.support_size.append(split.test.support_mask.sum(1).numpy())
        if split.history is not None:
            cur.histories.append({"label": f"split {split.split}", "rows": split.history})

    def summary(self, history: list[dict[str, float]] | None = None) -> dict[str, Any]:
        """Per scenario, what ``plots`` and ``report.md`` draw (JSON). ``history``: the
        given model's training history (its checkpoint's), drawn where no split trained."""
        out: dict[str, Any] = {}
        for scenario, cur in self.by_scenario.items():
            curves = cur.histories
            if not curves and history is not None:
                curves = [{"label": "the given model", "rows": history}]
            sizes = np.concatenate(cur.support_size)
            bucket, labels = activity_buckets(sizes)
            out[scenario] = {
                "unit": "interactions",
                "shots": list(self.shots),
                "shot_metrics": [list(m) for m in SHOT_METRICS],
                "shot_curve": self._shot_curve(cur),
                "shot_paired": self._shot_paired(cur),
                "steps": [],
                "trained_steps": 0,
                "step_curve": {},
                "per_user": {
                    "support_size": sizes.tolist(),
                    "bucket": bucket.tolist(),
                    "bucket_labels": labels,
                    "metric": ["ndcg@10", "per-user NDCG@10 (at the evaluated cut)"],
                    "xlabel": "the user's support interactions before any cut",
                    "ndcg@10": {m: np.concatenate(v).tolist() for m, v in cur.user_ndcg.items()},
                },
                "learning_curves": curves,
            }
        return out

    def _shot_curve(self, cur: _Scenario) -> dict[str, dict[str, list[tuple[float, float]]]]:
        """method -> metric -> per shot, (mean, std over splits) of the mean over users."""
        splits = list(cur.shot_users.values())
        out: dict[str, dict[str, list[tuple[float, float]]]] = {}
        for m in splits[0]:
            out[m] = {}
            for k, _ in SHOT_METRICS:
                means = np.array([[np.nanmean(u[k]) for u in s[m]] for s in splits])
                out[m][k] = list(zip(means.mean(0).tolist(), means.std(0).tolist(), strict=True))
        return out

    def _shot_paired(self, cur: _Scenario) -> dict[str, list[dict[str, Any]]]:
        """method -> per shot, the meta-learner minus it with a 95% CI over every split's
        test users (users resampled within splits)."""
        splits = list(cur.shot_users.values())
        metrics = [k for k, _ in SHOT_METRICS]
        meta = cur.method
        return {
            b: [
                paired_differences([s[meta][i] for s in splits], [s[b][i] for s in splits], metrics)
                for i in range(len(self.shots))
            ]
            for b in splits[0]
            if b != meta
        }


def write_implicit_report(
    out_dir: str | Path,
    results: dict[str, dict[str, Any]],
    curves: dict[str, Any],
    *,
    preamble: Sequence[str] = (),
) -> list[Path]:
    """Write ``results.json``, ``curves.json``, ``report.md`` and the plots; return them."""
    from metarec import plots  # matplotlib only when a report is drawn

    out = Path(out_dir)
    written = [write_results(results, out), write_json_atomic(out / "curves.json", curves)]
    shot, _, per_user, learning = PLOTS
    written += [
        plots.shot_curve(curves, out / shot),
        plots.per_user(curves, out / per_user),
        plots.learning_curves({s: c["learning_curves"] for s, c in curves.items()}, out / learning),
    ]
    body = [
        "# metarec evaluation report (implicit feedback)",
        "",
        *preamble,
        "",
        "## Results",
        "",
        "Test users of each scenario ranking the whole catalogue (support items excluded), "
        "means over user splits; below each table, every method's paired difference from "
        "the reference (the best baseline on validation users) with its 95% bootstrap CI: "
        "only those are evidence of a win.",
        "",
        "```text",
        format_implicit(results).rstrip(),
        "```",
        "",
        "## Plots",
        "",
        f"![Shot curve: NDCG@10 and Recall@20 vs support interactions]({shot})\n",
        f"![Per-user NDCG@10 by activity]({per_user})\n",
        f"![Learning curves]({learning})\n",
    ]
    if paired := shot_paired_markdown(curves):
        body += ["## Shot curve, paired", "", paired]
    return [*written, write_text_atomic(out / "report.md", "\n".join(body))]
