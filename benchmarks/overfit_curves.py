"""Why meta-training overfits on ML-100k: validation curves under ablations (defaults-log §8).

For each user split, meta-trains the defaults (and each variant) for ``--epochs`` epochs and
prints, per epoch, the mean validation-user MAE minus the tuned ``mf_foldin`` baseline's
(negative = better), averaged over splits, as JSON. Test users are never read. Variants:

- ``default``: the shipped defaults (ALS item factors fit on every training rating, queries
  re-drawn every epoch);
- ``fixed_queries``: ``meta.resample_query: false`` (each training user's query is fixed);
- ``prior_only``: only the ridge prior (``log_precision``) and the head train;
- ``fixed_queries+prior_only``;
- ``honest+prior_only``: fixed queries, and the item factors fit on the training users'
  *support* ratings only, so that the outer loss scores ratings ALS never saw (as for a new
  user); ``honest+prior_only@full`` scores the same weights with the full-data factors;
- ``slow_mlp``: the MLP and feature embeddings at 0.1x the outer lr.

    .venv/bin/python benchmarks/overfit_curves.py --data work/ml100k \
        --split-seeds 100 101 102 103 104 105 106 107 108 109 --epochs 30

About 5 s per split and variant on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

VARIANTS = (
    "default",
    "fixed_queries",
    "prior_only",
    "fixed_queries+prior_only",
    "honest+prior_only",
    "slow_mlp",
)
PRIOR = ("log_precision", "model.head")
ITEM = ("model.emb.item", "model.item_bias")


def _optimizer(learner, cfg, variant: str) -> torch.optim.Optimizer:
    from metarec import loop

    named = list(learner.named_parameters())
    if "prior_only" in variant:
        for name, p in named:
            p.requires_grad_(name.startswith(PRIOR))
    if variant != "slow_mlp":
        return loop.build_optimizer(learner, cfg)
    lr = cfg.meta.outer_lr
    groups = {"prior": [], "item": [], "rest": []}
    for name, p in named:
        key = "prior" if name.startswith(PRIOR) else "item" if name in ITEM else "rest"
        groups[key].append(p)
    return torch.optim.Adam(
        [
            {"params": groups["prior"], "lr": lr},
            {"params": groups["rest"], "lr": 0.1 * lr},
            {"params": groups["item"], "lr": lr * cfg.meta.item_lr_scale},
        ],
        lr=lr,
    )


def _fit(cls, train, n_items: int, hp: dict):
    return cls(**hp).fit(train, n_items=n_items)


def _mae(scorer, valid) -> np.ndarray:
    from metarec.metrics import task_mae

    pred = scorer.predict_items(valid, valid.query_items)
    return task_mae(pred, valid.query_ratings, valid.query_mask).numpy()


def _variant_curve(
    variant: str, ds, train, valid, full, hp, epochs: int, overrides: dict | None = None
) -> dict:
    """Per epoch: the variant's mean validation MAE minus MF fold-in's (``full``)."""
    from metarec import loop
    from metarec.config import apply_overrides, load_config
    from metarec.initialise import _set_item_embeddings, build_learner
    from metarec.mf import MFFoldIn
    from metarec.scorers import AdaptedScorer
    from metarec.train_state import TrainState

    baseline = _mae(full, valid)
    cfg = apply_overrides(load_config(None), **(overrides or {}))
    if "fixed_queries" in variant or "honest" in variant:
        cfg = apply_overrides(cfg, **{"meta.resample_query": False})
    mf = full
    if "honest" in variant:  # ALS on the training users' supports: their queries unseen
        supports = dataclasses.replace(train, query_mask=torch.zeros_like(train.query_mask))
        mf = MFFoldIn(**hp).fit(supports, n_items=ds.manifest["counts"]["items"])
    learner = build_learner(cfg, ds, train, valid, tuned_mf=mf)
    optimizer, state = _optimizer(learner, cfg, variant), TrainState()
    rows: dict[str, list[float]] = {}

    def score() -> None:
        rows.setdefault(variant, []).append(
            float((_mae(AdaptedScorer(learner), valid) - baseline).mean())
        )
        if "honest" in variant:
            swapped = copy.deepcopy(learner)
            with torch.no_grad():
                _set_item_embeddings(swapped.model, full.item_factors_, full.item_bias_)
            diff = _mae(AdaptedScorer(swapped), valid) - baseline
            rows.setdefault(f"{variant}@full", []).append(float(diff.mean()))

    score()
    for epoch in range(epochs):
        one_more = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, epochs=epoch + 1, patience=epochs + 1)
        )
        state = loop.run_epochs(one_more, learner, optimizer, loop.Shard.whole(train), valid, state)
        score()
    return rows


def curves(
    data: str, splits: list[int], epochs: int, variants: list[str], overrides: dict | None = None
) -> dict:
    from metarec.batch import from_table
    from metarec.data.prepared import open_prepared
    from metarec.data.splits import resplit
    from metarec.mf import choose_mf

    out: dict[str, list[list[float]]] = {}
    for split in splits:
        ds = resplit(open_prepared(data), split)
        train, valid = (from_table(ds.tasks("user_cold", s)) for s in ("train", "valid"))
        n_items = ds.manifest["counts"]["items"]
        full = choose_mf(train, valid, n_items)  # as evaluation tunes mf_foldin
        hp = {"dim": full.dim, "reg": full.reg}
        for variant in variants:
            for name, curve in _variant_curve(
                variant, ds, train, valid, full, hp, epochs, overrides
            ).items():
                out.setdefault(name, []).append(curve)
        print(f"split {split}: done", file=sys.stderr, flush=True)
    return {
        name: [round(float(x), 4) for x in np.mean(per_split, 0)] for name, per_split in out.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="prepared ML-100k (or any explicit dataset)")
    ap.add_argument("--split-seeds", type=int, nargs="+", default=list(range(100, 110)))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--try", dest="overrides", type=json.loads, default={}, help="JSON overrides")
    args = ap.parse_args()
    out = curves(args.data, args.split_seeds, args.epochs, args.variants, args.overrides)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
