"""Validation-only probe: does the implicit meta-learner know anything item-KNN does not?

Meta-trains the default learner on ``--data`` (an implicit dataset), cuts the validation
users to ``--max-support`` interactions, and ranks the whole catalogue by
``z(meta) + w z(item-KNN)`` (each method's scores standardised per user) for several w.
If a mix beats both parts, the meta-learner carries personal signal the neighbourhood
method lacks, and a model containing both should beat either. Test users are never
scored. Prints one JSON object: NDCG@10 per w ("knn" = item-KNN alone, "0.0" = meta alone).

    .venv/bin/python benchmarks/implicit_knn_probe.py --data work/shop-small --epochs 12
"""

from __future__ import annotations

import argparse
import json

import torch

from metarec.batch import TaskBatch, from_table
from metarec.config import load_config
from metarec.data.prepared import open_prepared
from metarec.implicit_baselines import ItemKNN
from metarec.implicit_metrics import valid_ndcg
from metarec.loop import fit
from metarec.scorers import AdaptedScorer


def _z(s: torch.Tensor) -> torch.Tensor:
    return (s - s.mean(1, keepdim=True)) / s.std(1, keepdim=True).clamp_min(1e-9)


class Mix:
    """``z(meta) + w z(knn)``, or item-KNN alone when ``w`` is None."""

    def __init__(self, meta: AdaptedScorer, knn: ItemKNN, w: float | None) -> None:
        self.meta, self.knn, self.w = meta, knn, w

    def predict_items(self, tasks: TaskBatch, items: torch.Tensor) -> torch.Tensor:
        b = _z(self.knn.predict_items(tasks, items).double())
        if self.w is None:
            return b
        return _z(self.meta.predict_items(tasks, items).double()) + self.w * b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--scenario", default="user_cold")
    ap.add_argument("--max-support", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--neighbours", type=int, default=200)
    ap.add_argument("--prior-scale", type=float, default=4.0)
    args = ap.parse_args()
    ds = open_prepared(args.data)
    n = ds.manifest["counts"]["items"]
    train = from_table(ds.tasks(args.scenario, "train"))
    valid = from_table(ds.tasks(args.scenario, "valid")).cut_support(args.max_support)
    cfg = load_config(None, **{"train.epochs": args.epochs, "train.scenario": args.scenario})
    meta = AdaptedScorer(fit(cfg, ds).learner, prior_scale=args.prior_scale)
    knn = ItemKNN(neighbours=args.neighbours).fit(train, n_items=n)
    weights = (0.0, 0.5, 1.0, 2.0, 4.0, None)
    out = {
        "knn" if w is None else str(w): round(valid_ndcg(Mix(meta, knn, w), valid, n), 4)
        for w in weights
    }
    print(json.dumps({"valid_ndcg@10": out, **vars(args)}))


if __name__ == "__main__":
    main()
