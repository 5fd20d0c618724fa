"""`metarec report`: the evaluation plus the curves people look at, as a report directory.

``evaluate`` scores every method on every scenario and seed; this module hooks into each
seed (``evaluate(on_seed=...)``) to measure, with the very scorers it trained and tuned:

- the **shot curve**: query MAE and nDCG@3 when each test user's support set is cut to
  1, 2, 4, ... 32 ratings (a seeded random subset, nested: the 2-rating set contains the
  1-rating one), so meta-learning's promise, good from a handful of ratings, is measured
  rather than assumed;
- the **adaptation-step curve**: MAE after 0..10 inner steps at serve time, trained steps
  marked, which shows whether serving could run fewer steps (or diverges with more);
- **per-user errors** by activity (support size) bucket: who the model serves badly;
- the **learning curves** of the training run(s).

Everything is vectorized over users (masks, not loops); the curves' numbers go to
``curves.json`` beside ``results.json`` so the plots can be redrawn or compared.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metarec.batch import TaskBatch
from metarec.config import MetarecConfig
from metarec.evaluate import REPORTED, SeedScores, score_tasks, users_over_seeds
from metarec.metrics import mean_metrics
from metarec.results import (
    has_spread,
    method_rows,
    pipe_table,
    write_json_atomic,
    write_results,
    write_text_atomic,
)
from metarec.scorers import AdaptedScorer
from metarec.stats import LOWER_IS_BETTER, paired_differences, verdict

__all__ = [
    "SHOTS",
    "STEPS",
    "CurveCollector",
    "activity_buckets",
    "markdown_results",
    "report_header",
    "support_keys",
    "truncate_support",
    "write_report",
]

SHOTS = (1, 2, 4, 8, 16, 32)
STEPS = tuple(range(11))
# beside the meta-learner: the issue's few-shot (mf_foldin) and zero-shot (item_mean) bars
CURVE_BASELINES = ("finetune", "mf_foldin", "bias", "item_mean", "transfer")
SHOT_METRICS = ("mae", "ndcg@3")
PLOTS = ("shot_curve.png", "step_curve.png", "per_user.png", "learning_curves.png")


def support_keys(tasks: TaskBatch, seed: int) -> Tensor:
    """(T, S) uniform keys deciding which support ratings a truncated task keeps."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(tasks.support_mask.shape, generator=g)


def truncate_support(tasks: TaskBatch, k: int, keys: Tensor) -> TaskBatch:
    """Keep each task's ``min(k, n)`` valid support ratings with the smallest ``keys``.

    Kept entries move to the front (ordered by key) and the width shrinks to ``min(k, S)``:
    ``TaskBatch.select`` trims columns past the longest valid prefix, so a kept rating must
    never sit behind the cut. The same ``keys`` for every ``k`` make the subsets nested.

    Args:
        tasks: (T, S) support tensors; queries are left as they are.
        keys: (T, S) floats, e.g. ``support_keys(tasks, seed)``.
    """
    if k < 0:
        raise ValueError(f"k: got {k}; expected an int >= 0")
    mask = tasks.support_mask
    # (T, min(k, S)) valid first; k = 0 keeps one all-padding column (a cold-start user)
    order = keys.masked_fill(~mask, torch.inf).argsort(1)[:, : max(k, 1)]
    kept = mask.gather(1, order) & (k > 0)  # False where a task has fewer than k ratings
    return replace(
        tasks,
        support_items=tasks.support_items.gather(1, order),
        support_ratings=tasks.support_ratings.gather(1, order),
        support_mask=kept,
    )


def activity_buckets(sizes: np.ndarray, n: int = 4) -> tuple[np.ndarray, list[str]]:
    """Users into (at most) ``n`` buckets of similar count by support size.

    A user's bucket is decided by where the first user of the same size falls in the
    sorted order, so equal sizes never straddle two buckets (heavily tied sizes give fewer).

    Returns:
        (T,) bucket index of each user (0 = least active) and a label per bucket
        (``"4-10"``, or ``"3"`` when a bucket holds one size).
    """
    sizes = np.asarray(sizes)
    first = np.searchsorted(np.sort(sizes), sizes, side="left")  # rank of the first equal
    _, bucket = np.unique(first * n // max(len(sizes), 1), return_inverse=True)
    labels = []
    for b in range(int(bucket.max(initial=-1)) + 1):
        lo, hi = int(sizes[bucket == b].min()), int(sizes[bucket == b].max())
        labels.append(f"{lo}-{hi}" if lo != hi else f"{lo}")
    return bucket, labels


def _mean_std(seeds: list[list[float]]) -> list[tuple[float, float]]:
    """Seeds x points -> (mean, std over seeds) per point."""
    arr = np.asarray(seeds, dtype=float)  # (seeds, points)
    return list(zip(arr.mean(0).tolist(), arr.std(0).tolist(), strict=True))


@dataclass
class _ScenarioCurves:
    steps: dict[str, list[list[float]]] = field(default_factory=dict)  # method -> seeds x steps
    user_mae: dict[str, list[np.ndarray]] = field(default_factory=dict)  # method -> seeds x T
    support_size: np.ndarray | None = None
    histories: list[dict[str, Any]] = field(default_factory=list)
    trained_steps: int = 0
    method: str = ""  # the meta-learner's name
    # split -> one entry per seed: method -> per shot, SHOT_METRICS -> (T,) per-user values
    shot_users: dict[Any, list[dict[str, list[dict[str, Tensor]]]]] = field(default_factory=dict)

    def shot_curve(self) -> dict[str, dict[str, list[tuple[float, float]]]]:
        """method -> metric -> per shot, (mean, std) over every (split, seed) of its mean
        over test users."""
        runs = [seed for seeds in self.shot_users.values() for seed in seeds]
        means = {m: [[mean_metrics(u) for u in run[m]] for run in runs] for m in runs[0]}
        return {
            m: {k: _mean_std([[r[k] for r in per_k] for per_k in v]) for k in SHOT_METRICS}
            for m, v in means.items()
        }


class CurveCollector:
    """``evaluate``'s ``on_seed`` hook: measures the curves with each seed's scorers.

    Args:
        history: the learning curve of a given model (its checkpoint's training history),
            drawn for the scenarios that scored it; in-process fits bring their own.
    """

    def __init__(
        self,
        *,
        shots: Sequence[int] = SHOTS,
        steps: Sequence[int] = STEPS,
        history: list[dict[str, float]] | None = None,
    ) -> None:
        self.shots, self.steps = tuple(shots), tuple(steps)
        self.history = history
        self.by_scenario: dict[str, _ScenarioCurves] = {}

    def __call__(self, seed: SeedScores) -> None:
        fit, test, threshold = seed.fit, seed.test, seed.relevance_threshold
        cur = self.by_scenario.setdefault(fit.scenario, _ScenarioCurves())
        methods = [m for m in (fit.method, *CURVE_BASELINES) if m in fit.scorers]
        keys = support_keys(test, fit.seed)
        truncated = [truncate_support(test, k, keys) for k in self.shots]
        users: dict[str, list[dict[str, Tensor]]] = {}
        for m in methods:
            scored = (
                score_tasks(fit.scorers[m], t, relevance_threshold=threshold) for t in truncated
            )
            users[m] = [{k: u[k] for k in SHOT_METRICS} for u in scored]
            if isinstance(fit.scorers[m], AdaptedScorer) and _stepped(fit.scorers[m]):
                curve = self._step_curve(fit.scorers[m], test, threshold)
                cur.steps.setdefault(m, []).append(curve)
            cur.user_mae.setdefault(m, []).append(seed.per_task[m]["mae"].numpy())
        cur.shot_users.setdefault(seed.split, []).append(users)
        cur.method = fit.method
        cur.support_size = test.support_mask.sum(1).numpy()
        first = fit.scorers[fit.method]
        assert isinstance(first, AdaptedScorer)
        cur.trained_steps = first.knobs().get("steps", 0)
        if fit.history is not None:
            cur.histories.append({"label": f"seed {fit.seed}", "rows": fit.history})
        elif self.history is not None:  # the given model: drawn once, where first scored
            cur.histories.append({"label": "the given model", "rows": self.history})
            self.history = None

    def _step_curve(self, scorer: AdaptedScorer, tasks: TaskBatch, threshold: float) -> list[float]:
        """MAE after each number of steps, every other knob as tuned."""
        return [
            mean_metrics(
                score_tasks(replace(scorer, steps=s), tasks, relevance_threshold=threshold)
            )["mae"]
            for s in self.steps
        ]

    def summary(self) -> dict[str, Any]:
        """Curves as JSON: per scenario, mean and std over seeds at every point."""
        out: dict[str, Any] = {}
        for scenario, cur in self.by_scenario.items():
            assert cur.support_size is not None
            bucket, labels = activity_buckets(cur.support_size)
            out[scenario] = {
                "shots": list(self.shots),
                "shot_curve": cur.shot_curve(),
                "shot_paired": self._shot_paired(cur),
                "steps": list(self.steps),
                "trained_steps": cur.trained_steps,
                "step_curve": {m: _mean_std(v) for m, v in cur.steps.items()},
                "per_user": {
                    "support_size": cur.support_size.tolist(),
                    "bucket": bucket.tolist(),
                    "bucket_labels": labels,
                    "mae": {m: np.mean(v, axis=0).tolist() for m, v in cur.user_mae.items()},
                },
                "learning_curves": cur.histories,
            }
        return out

    def _shot_paired(self, cur: _ScenarioCurves) -> dict[str, list[dict[str, Any]]]:
        """baseline -> per shot, the meta-learner minus it: ``{metric: {"diff", "ci95"}}``
        over the test users of every split (each user averaged over init seeds), so that a
        few-shot claim has a CI like the full-support one."""
        out: dict[str, list[dict[str, Any]]] = {}
        meta, splits = cur.method, list(cur.shot_users.values())
        for b in (m for m in splits[0][0] if m != meta):
            out[b] = []
            for i in range(len(self.shots)):
                pooled = [
                    users_over_seeds([{m: seed[m][i] for m in (meta, b)} for seed in seeds])
                    for seeds in splits
                ]
                a_side, b_side = [p[meta] for p in pooled], [p[b] for p in pooled]
                out[b].append(paired_differences(a_side, b_side, SHOT_METRICS))
        return out


def shot_paired_markdown(curves: dict[str, Any]) -> str:
    """Per scenario, the meta-learner minus each curve baseline at every shot count: MAE
    and nDCG@3 with the 95% CI and the verdict (a win only when the CI excludes 0)."""
    lines: list[str] = []
    for scenario, cur in curves.items():
        paired = cur.get("shot_paired") or {}
        if not paired:
            continue
        shots = cur["shots"]
        lines += [f"### {scenario}: meta-learner minus each method, per support size", ""]
        for metric in [k for k, _ in cur.get("shot_metrics", ())] or SHOT_METRICS:
            rows = []
            for b, per_k in paired.items():
                cells = [b]
                for d in (p[metric] for p in per_k):
                    lo, hi = d["ci95"]
                    v = verdict(metric, d["diff"], (lo, hi))
                    cell = f"{d['diff']:+.4f} [{lo:+.3f}, {hi:+.3f}] {v}"
                    cells.append(f"**{cell}**" if v == "win" else cell)
                rows.append(cells)
            lines += [*pipe_table([metric, *(f"K = {k}" for k in shots)], rows), ""]
    return "\n".join(lines)


def _stepped(scorer: AdaptedScorer) -> bool:
    """Whether the scorer adapts by gradient steps (a ridge head is solved, not stepped)."""
    return scorer.learner.cfg.inner_solver == "gd"


def _cell(row: dict[str, Any], metric: str, spread: bool = True) -> str:
    return f"{row[metric]:.4f} ± {row['std'][metric]:.4f}" if spread else f"{row[metric]:.4f}"


def markdown_results(
    results: dict[str, dict[str, Any]],
    *,
    metrics: Sequence[str] = REPORTED,
    notes: dict[str, str] | None = None,
) -> str:
    """One pipe table per scenario, ``mean ± std`` (the mean alone where only one run was
    measured), the best of each column in **bold**.

    Best is the lowest MAE/RMSE and the highest of the rest, compared as printed (4 places),
    so methods tied on the page are bold together, and a column where all tie (recall of
    new items that nobody ranks, say) has none; NaN (undefined) cells never win.
    """
    parts = []
    for scenario, rows in results.items():
        methods = method_rows(rows)
        best = {}
        for m in metrics:
            vals = [round(r[m], 4) for r in methods.values() if np.isfinite(r[m])]
            # a column where every method ties says nothing: nothing bold there
            tied = len(set(vals)) <= 1 and len(methods) > 1
            best[m] = None if tied else (min if m in LOWER_IS_BETTER else max)(vals)
        lines = [f"### {scenario}", ""]
        if notes and scenario in notes:
            lines += [notes[scenario], ""]
        spread = has_spread(rows.get("_protocol", {"init_seeds": [0, 1]}))
        table = [
            [name]
            + [
                f"**{_cell(row, m, spread)}**"
                if round(row[m], 4) == best[m]
                else _cell(row, m, spread)
                for m in metrics
            ]
            for name, row in methods.items()
        ]
        lines += pipe_table(["method", *metrics], table)
        lines += _paired_lines(rows, metrics)
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _paired_lines(rows: dict[str, Any], metrics: Sequence[str]) -> list[str]:
    """Per meta method, a table of its paired difference with every other method."""
    proto = rows.get("_protocol", {})
    lines: list[str] = []
    for a, against in rows.get("_paired", {}).items():
        lines += [
            "",
            f"`{a}` minus each method, paired over {sum(proto.get('test_users', []))} test "
            f"users of splits {proto.get('split_seeds')}: difference [95% bootstrap CI]. "
            "**win**/*loss* only where the CI excludes 0; otherwise a tie.",
            "",
        ]
        table = []
        for b, diffs in against.items():
            cells = [b]
            for m in metrics:
                d = diffs[m]
                v = verdict(m, d["diff"], d["ci95"])
                text = f"{d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"
                cells.append(
                    {"win": f"**{text} win**", "loss": f"*{text} loss*"}.get(v, f"{text} tie")
                )
            table.append(cells)
        lines += pipe_table(["vs", *metrics], table)
    if "adapt" in proto:
        lines += [
            "",
            f"Adaptation chosen on validation users: `{json.dumps(proto['adapt'])}`; "
            f"relevance threshold {proto['relevance_threshold']:g}.",
        ]
    return lines


def report_header(
    manifest: dict[str, Any],
    cfg: MetarecConfig,
    results: dict[str, dict[str, Any]],
    *,
    data: str,
    model: str | None,
    seeds: Sequence[int],
    transfer: dict[str, Any] | None = None,
) -> tuple[str, list[str], dict[str, str]]:
    """Title, preamble lines (what was evaluated, pinned by dataset hash and protocol) and
    per-scenario notes (where a given model could not be scored and a fit replaced it)."""
    title = "metarec evaluation report"
    preamble = [
        f"- data: `{data}` ({manifest['source']['name']}, dataset hash "
        f"`{manifest['dataset_hash']}`, protocol `{json.dumps(manifest['protocol'])}`)",
        f"- model: `{model}`" if model else "- model: meta-trained in process per seed",
        f"- user splits: {_splits_of(results)}; init seeds within each: "
        f"{' '.join(map(str, seeds))}; meta config: `{json.dumps(cfg.to_dict()['meta'])}`",
    ]
    method = cfg.meta.algorithm
    notes = {}
    if transfer is not None:
        title = f"Cross-domain transfer to the users of {data}"
        preamble.append(
            f"- `transfer`: the model trained on dataset `{transfer['source_dataset_hash']}`, "
            "features mapped by name, every item id unseen; `transfer_noadapt`: the same "
            f"without adaptation; `{method}` and the baselines are trained on this dataset. "
            "Names matched per feature: "
            + ", ".join(f"{k} {v}" for k, v in transfer["coverage"].items())
        )
    elif model:
        for scenario, rows in results.items():
            if rows[method].get("source") == "fit":
                notes[scenario] = (
                    f"The model saw ratings this scenario holds out, so `{method}` here was "
                    "meta-trained in process per seed with the model's config."
                )
    return title, preamble, notes


def _splits_of(results: dict[str, dict[str, Any]]) -> str:
    for rows in results.values():
        if "_protocol" in rows:
            return " ".join(map(str, rows["_protocol"]["split_seeds"]))
    return "the prepared one"


def write_report(
    out_dir: str | Path,
    results: dict[str, dict[str, Any]],
    curves: dict[str, Any],
    *,
    title: str,
    preamble: Iterable[str] = (),
    notes: dict[str, str] | None = None,
) -> list[Path]:
    """Write ``results.json``, ``curves.json``, ``report.md`` and the four PNG plots.

    Returns:
        Every file written (what a tracking shell logs as artifacts).
    """
    from metarec import plots  # matplotlib only when a report is drawn

    out = Path(out_dir)
    written = [write_results(results, out), write_json_atomic(out / "curves.json", curves)]
    written += [
        plots.shot_curve(curves, out / PLOTS[0]),
        plots.step_curve(curves, out / PLOTS[1]),
        plots.per_user(curves, out / PLOTS[2]),
        plots.learning_curves({s: c["learning_curves"] for s, c in curves.items()}, out / PLOTS[3]),
    ]
    body = [f"# {title}", "", *preamble, ""]
    body += [
        "## Results",
        "",
        "Test users of each scenario, mean ± std over user splits (over init seeds when "
        "there is one split); best mean per column in **bold** (lowest MAE/RMSE, highest "
        "otherwise). Below each table, the meta-learner's paired differences with 95% "
        "bootstrap CIs: only those are evidence of a win.",
        "",
        markdown_results(results, notes=notes),
        "## Plots",
        "",
    ]
    captions = (
        "Shot curve: query error vs support ratings per user",
        "Adaptation steps at serve time",
        "Per-user error by activity",
        "Learning curves",
    )
    body += [f"![{c}]({p})\n" for c, p in zip(captions, PLOTS, strict=True)]
    if paired := shot_paired_markdown(curves):
        body += ["## Shot curve, paired", "", paired]
    report = write_text_atomic(out / "report.md", "\n".join(body))
    return [*written, report]
