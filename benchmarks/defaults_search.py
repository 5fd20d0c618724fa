"""Choose the meta-learner's defaults on *validation* users only (issue 14's written log).

For each configuration (a set of ``--set`` overrides) and each user split, meta-train on
the training users and score the validation users, next to ``bias`` and ``mf_foldin``
tuned the same way (their grids chosen on the same validation users). Test users are
never read. Prints one JSON line per (dataset, configuration) with mean validation
MAE/RMSE/nDCG@3 over splits and the paired difference to each baseline.

    python benchmarks/defaults_search.py --data work/ml100k --split-seeds 100 101 102 \
        --try '{}' --try '{"meta.item_lr_scale": 0.1}'

``--ensemble N`` also meta-trains seeds ``seed + 1`` ... ``seed + N - 1`` of each candidate
and scores the mean prediction of the first n of them (``<method>_mean<n>``, n = 2..N): what
averaging runs that differ only in their seed would buy (defaults-log §12).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from torch import Tensor

from metarec.batch import TaskBatch, from_table
from metarec.config import apply_overrides, load_config
from metarec.data.prepared import open_prepared
from metarec.data.splits import resplit
from metarec.evaluate import fit_methods, score_tasks
from metarec.report import support_keys, truncate_support
from metarec.scorers import Scorer, relevance_threshold

METRICS = ("mae", "rmse", "ndcg@3")


class MeanScorer:
    """The mean prediction of several scorers (a seed ensemble, for comparison only)."""

    def __init__(self, scorers: list[Scorer]) -> None:
        self.scorers = scorers

    def predict_items(self, tasks: TaskBatch, items: Tensor) -> Tensor:
        return sum(s.predict_items(tasks, items) for s in self.scorers) / len(self.scorers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--split-seeds", type=int, nargs="+", default=[100, 101, 102])
    ap.add_argument("--try", dest="tries", action="append", default=[], help="JSON overrides")
    ap.add_argument("--config", default=None)
    ap.add_argument(
        "--shots",
        type=int,
        nargs="*",
        default=[],
        metavar="K",
        help="also report validation MAE with each user's support cut to K ratings",
    )
    ap.add_argument(
        "--ensemble",
        type=int,
        default=1,
        metavar="N",
        help="also score the mean prediction of N meta-learners (seeds seed..seed+N-1)",
    )
    args = ap.parse_args()
    base = open_prepared(args.data)
    threshold = relevance_threshold(base.manifest)
    for raw in args.tries or ["{}"]:
        overrides = json.loads(raw)
        cfg = load_config(args.config, **overrides)
        per: dict[str, list[dict[str, np.ndarray]]] = {}
        t0 = time.time()
        for seed in args.split_seeds:
            ds = resplit(base, seed)
            fit = fit_methods(cfg, ds, "user_cold", ("bias", "mf_foldin"))
            members = [fit.scorers[fit.method]] + [
                fit_methods(apply_overrides(cfg, seed=cfg.seed + i), ds, "user_cold", ()).scorers[
                    fit.method
                ]
                for i in range(1, args.ensemble)
            ]
            for n in range(2, args.ensemble + 1):
                fit.scorers[f"{fit.method}_mean{n}"] = MeanScorer(members[:n])
            valid = from_table(ds.tasks("user_cold", "valid"))
            keys = support_keys(valid, seed)
            cuts = {k: truncate_support(valid, k, keys) for k in args.shots}
            for name, scorer in fit.scorers.items():
                m = score_tasks(scorer, valid, relevance_threshold=threshold)
                row = {k: m[k].numpy() for k in ("mae", "sse", "count", "ndcg@3")}
                for k, cut in cuts.items():
                    shot = score_tasks(scorer, cut, relevance_threshold=threshold)
                    row[f"mae@{k}"] = shot["mae"].numpy()
                per.setdefault(name, []).append(row)
        out = {"data": args.data, "try": overrides, "seconds": round(time.time() - t0, 1)}
        for name, runs in per.items():
            mae = np.concatenate([r["mae"] for r in runs])
            sse = np.concatenate([r["sse"] for r in runs])
            cnt = np.concatenate([r["count"] for r in runs])
            nd = np.concatenate([r["ndcg@3"] for r in runs])
            out[name] = {
                "mae": round(float(mae.mean()), 4),
                "rmse": round(float(np.sqrt(sse.sum() / cnt.sum())), 4),
                "ndcg@3": round(float(nd.mean()), 4),
            }
            for k in args.shots:
                shot = np.concatenate([r[f"mae@{k}"] for r in runs])
                out[name][f"mae@{k}"] = round(float(shot.mean()), 4)
        out["adapt"] = fit.adapt
        if fit.history:
            best = min(fit.history, key=lambda r: r["valid/mae"])
            out["best_epoch"], out["epochs_run"] = best["epoch"], len(fit.history)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
