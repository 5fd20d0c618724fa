"""The report's figures, drawn from ``report.CurveCollector.summary()`` (``curves.json``).

One column per scenario in every figure, the same colour per method everywhere, labelled
axes and one legend per figure: the plots are read side by side. matplotlib's Agg backend,
so drawing never needs a display (servers, Ray jobs, CI).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the backend
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = ["learning_curves", "per_user", "shot_curve", "step_curve"]

# meta-learner: C0; ratings baselines, then implicit ones
COLOURS = {
    "finetune": "C1",
    "mf_foldin": "C2",
    "transfer": "C3",
    "item_knn": "C2",
    "ease": "C3",
    "als": "C4",
    "bpr": "C5",
    "global_model": "C6",
    "popularity": "C7",
    "bias": "C8",
    "item_mean": "C9",
    "user_mean": "C5",
    "global_mean": "C7",
}
LABELS = {
    "finetune": "fine-tune (global model)",
    "mf_foldin": "MF fold-in",
    "transfer": "transfer",
    "item_knn": "item-KNN",
    "ease": "EASE",
    "als": "ALS fold-in",
    "bpr": "BPR",
    "global_model": "global model",
    "popularity": "popularity",
    "bias": "bias",
    "item_mean": "item mean",
    "user_mean": "user mean",
    "global_mean": "global mean",
}


def _colour(method: str) -> str:
    return COLOURS.get(method, "C0")


def _label(method: str) -> str:
    return LABELS.get(method, f"{method} (meta-learned)")


def _grid(n_rows: int, titles: list[str], *, height: float = 3.0) -> tuple[Figure, Any]:
    """``n_rows`` x ``len(titles)`` axes, titled across the top; never narrower than 7 in
    (a title and a legend must fit even with one column)."""
    cols = max(len(titles), 1)
    size = (max(3.4 * cols + 0.6, 7.0), height * n_rows + 0.9)
    fig, axes = plt.subplots(n_rows, cols, figsize=size, dpi=90, squeeze=False)
    for ax, title in zip(axes[0], titles, strict=False):
        ax.set_title(title)
    return fig, axes


def _finish(fig: Figure, path: Path, title: str) -> Path:
    """One legend under the axes (as many columns as the width holds), title, save."""
    handles, labels = fig.axes[0].get_legend_handles_labels()
    bottom = 0.0
    if handles:
        ncol = min(len(labels), max(1, int(fig.get_figwidth() // 2.6)))
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=9)
        rows = -(-len(labels) // ncol)
        bottom = (0.3 * rows + 0.2) / fig.get_figheight()  # legend height, as a fraction
    fig.suptitle(title)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# What the curves of a ratings report show; an implicit one names its own in curves.json.
RATING_SHOT_METRICS = (("mae", "query MAE"), ("ndcg@3", "query nDCG@3"))
RATING_PER_USER = ("mae", "per-user query MAE")


def shot_curve(curves: dict[str, Any], path: Path) -> Path:
    """Two metrics (query MAE and nDCG@3 on ratings; a scenario's ``shot_metrics``
    otherwise) against support size per user (log2 x axis, 0 included): two rows, one
    column per scenario; one scenario gets the two panels side by side."""
    scenarios = list(curves)
    single = len(scenarios) == 1  # then the two metrics side by side, not stacked
    fig, axes = _grid(1, scenarios * 2) if single else _grid(2, scenarios)
    for col, scenario in enumerate(scenarios):
        c = curves[scenario]
        for row, (metric, name) in enumerate(c.get("shot_metrics", RATING_SHOT_METRICS)):
            ax = axes[0][row] if single else axes[row][col]
            for method, values in c["shot_curve"].items():
                mean, std = zip(*values[metric], strict=True)
                ax.errorbar(
                    c["shots"], mean, yerr=std, marker="o", ms=3, capsize=2,
                    color=_colour(method), label=_label(method),
                )  # fmt: skip
            ax.set_xscale("symlog", base=2, linthresh=1)  # log2, and 0 shots fits on it
            ax.set_xticks(c["shots"], [str(k) for k in c["shots"]])
            ax.set_xlabel(f"support {c.get('unit', 'ratings')} per user (at most)")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
    return _finish(fig, path, "Shot curve: accuracy vs what is known per test user")


def step_curve(curves: dict[str, Any], path: Path) -> Path:
    """Query MAE against inner steps at serve time; the dashed line marks the trained steps."""
    scenarios = list(curves)
    fig, axes = _grid(1, scenarios)
    for col, scenario in enumerate(scenarios):
        c, ax = curves[scenario], axes[0][col]
        if not c["step_curve"]:  # the ridge head is solved in closed form: no steps to vary
            ax.text(0.5, 0.5, "no gradient-step adaptation\n(ridge solver)", ha="center",
                    va="center", transform=ax.transAxes)  # fmt: skip
            continue
        for method, values in c["step_curve"].items():
            mean, std = zip(*values, strict=True)
            ax.errorbar(
                c["steps"], mean, yerr=std, marker="o", ms=3, capsize=2,
                color=_colour(method), label=_label(method),
            )  # fmt: skip
        ax.axvline(c["trained_steps"], color="grey", ls="--", lw=1, label="steps used in training")
        ax.set_xlabel("inner (adaptation) steps")
        ax.set_ylabel("query MAE")
        ax.grid(alpha=0.3)
    return _finish(fig, path, "Adaptation steps at serve time")


def per_user(curves: dict[str, Any], path: Path) -> Path:
    """Box plots of a per-user metric (query MAE on ratings, mean over seeds per user; the
    scenario's ``per_user.metric`` otherwise) by support-size bucket."""
    scenarios = list(curves)
    fig, axes = _grid(1, scenarios, height=3.4)
    for col, scenario in enumerate(scenarios):
        pu, ax = curves[scenario]["per_user"], axes[0][col]
        metric, name = pu.get("metric", RATING_PER_USER)
        methods = list(pu[metric])
        width = 0.8 / max(len(methods), 1)
        for j, method in enumerate(methods):
            data = [
                [e for e, b in zip(pu[metric][method], pu["bucket"], strict=True) if b == k]
                for k in range(len(pu["bucket_labels"]))
            ]
            pos = [k + (j - (len(methods) - 1) / 2) * width for k in range(len(data))]
            box = ax.boxplot(
                data,
                positions=pos,
                widths=width * 0.9,
                patch_artist=True,
                showfliers=False,
                medianprops={"color": "black"},
            )
            for patch in box["boxes"]:
                patch.set(facecolor=_colour(method), alpha=0.6)
            ax.plot([], [], color=_colour(method), lw=6, alpha=0.6, label=_label(method))
        counts = [pu["bucket"].count(k) for k in range(len(pu["bucket_labels"]))]
        ticks = [f"{lab}\n({n} users)" for lab, n in zip(pu["bucket_labels"], counts, strict=True)]
        ax.set_xticks(range(len(ticks)), ticks, fontsize=8)
        ax.set_xlabel(pu.get("xlabel", "support ratings per user"))
        ax.set_ylabel(name)
        ax.grid(alpha=0.3, axis="y")
    return _finish(fig, path, "Per user, by activity (boxes: quartiles, whiskers 1.5 IQR)")


def learning_curves(
    runs: dict[str, list[dict[str, Any]]],
    path: Path,
    *,
    title: str = "Learning curves (one colour per scenario, further seeds faded)",
) -> Path:
    """Train query loss and the validation objective per epoch of training runs.

    Args:
        runs: group (one colour; a scenario) -> runs ``{"label", "rows"}``, rows being a
            ``TrainState.history`` (``epoch``, ``train/query_loss``, and ``valid/mae`` or
            on implicit data ``valid/1-ndcg_at_10``); a group's later runs (other seeds) are
            drawn faded.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=90)
    drawn, valid = 0, "valid/mae"
    for i, (group, group_runs) in enumerate(runs.items()):
        for j, run in enumerate(group_runs):
            epochs = [r["epoch"] for r in run["rows"]]
            style = {"color": f"C{i}", "alpha": 0.9 if j == 0 else 0.45, "lw": 1.3}
            label = None
            if j == 0:
                n = len(group_runs)
                label = f"{group} ({n} seeds)" if n > 1 else f"{group}: {run['label']}"
            axes[0].plot(epochs, [r["train/query_loss"] for r in run["rows"]], label=label, **style)
            valid = next((k for k in run["rows"][0] if k.startswith("valid/")), valid)
            axes[1].plot(epochs, [r[valid] for r in run["rows"]], label=label, **style)
            drawn += 1
    ratings = valid == "valid/mae"
    axes[0].set_ylabel("train query loss (stars²)" if ratings else "train query loss")
    axes[1].set_ylabel("validation MAE (stars)" if ratings else "validation 1 - NDCG@10")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if not drawn:
        axes[0].text(0.5, 0.5, "no training history", ha="center", transform=axes[0].transAxes)
    return _finish(fig, path, title)


def sweep(frame: Any, path: Path) -> Path:
    """A sweep's trials (``frame``: trials.csv as a DataFrame): best valid MAE of each trial
    against its outer lr and its inner lr (gradient steps) or prior precision (ridge
    solver), coloured by algorithm.

    Log axes: learning rates span decades, and a diverged trial's error is orders of
    magnitude above the rest (it would flatten every other point onto the axis).
    """
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    ridge = (frame["meta.inner_solver"] == "ridge").all()
    keys = ["meta.prior_precision" if ridge else "meta.inner_lr", "meta.outer_lr"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=100, sharey=True)
    mae = frame["best_valid_mae"]
    algorithms = sorted(frame["meta.algorithm"].unique())
    colour = {a: f"C{i}" for i, a in enumerate(algorithms)}
    for ax, key in zip(axes, keys, strict=True):
        for name in algorithms:
            sel = frame[frame["meta.algorithm"] == name]
            for stopped, marker, suffix in ((False, "o", ""), (True, "x", ", stopped early")):
                part = sel[(sel["status"] != "completed") == stopped]
                if len(part):
                    ax.scatter(
                        part[key],
                        part["best_valid_mae"],
                        c=colour[name],
                        marker=marker,
                        label=f"{name}{suffix}",
                    )
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
    if mae.max() > 3 * mae.min() > 0:
        axes[0].set_yscale("log")
    axes[0].set_ylabel("best validation MAE")
    axes[1].legend(title="algorithm", fontsize=8, loc="best")
    fig.suptitle(f"sweep: {len(frame)} trials")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
