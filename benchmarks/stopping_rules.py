"""Which epoch to keep: stopping rules compared on *validation* users only (defaults-log §7).

``collect`` meta-trains the defaults (plus ``--try`` overrides) on each user split's
training users for ``--epochs`` epochs and records every validation user's MAE after each
epoch, at each test-time prior scale, for the weights as trained and for the running mean
of the end-of-epoch weights; MF fold-in and the bias model, tuned on the same users, too.
``compare`` then lets each rule choose (epoch, prior scale) on a random half of a split's
validation users and scores the choice on the other half, 20 times over, and prints the
mean difference to MF fold-in on those held-out halves as JSON (negative = better):

    .venv/bin/python benchmarks/stopping_rules.py collect --data work/ml100k \
        --split-seeds 100 101 102 103 104 105 106 107 108 109 --out work/stopping.npz
    .venv/bin/python benchmarks/stopping_rules.py compare work/stopping.npz

Test users are never read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

PRIOR_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)
CURVES = ("trained", "averaged")


def _per_user_mae(pred, tasks) -> np.ndarray:
    from metarec.metrics import task_mae

    return task_mae(pred, tasks.query_ratings, tasks.query_mask).numpy()


def collect(
    data: str, splits: list[int], epochs: int, overrides: dict, out: str, resamples: int = 1
) -> None:
    """With ``resamples`` K > 1, each validation user is also scored on K - 1 fresh random
    support/query re-splits of their ratings, and ``<split>_<curve>_resampled`` holds the
    mean over all K: a less noisy estimate of the same user's error."""
    from metarec import loop
    from metarec.baselines import classic_baselines
    from metarec.batch import from_table
    from metarec.config import apply_overrides, load_config
    from metarec.data.prepared import open_prepared
    from metarec.data.splits import resplit
    from metarec.evaluate import tuned
    from metarec.initialise import build_learner
    from metarec.scorers import AdaptedScorer
    from metarec.train_state import TrainState

    arrays: dict[str, np.ndarray] = {}
    for split in splits:
        cfg = apply_overrides(load_config(None), **overrides)
        ds = resplit(open_prepared(data), split)
        train, valid = (from_table(ds.tasks("user_cold", s)) for s in ("train", "valid"))
        n_items = ds.manifest["counts"]["items"]
        grids = classic_baselines(seed=cfg.seed)
        fitted = {
            name: tuned(
                lambda hp, g=grids[name], t=train, n=n_items: g.cls(**hp).fit(t, n_items=n),
                grids[name].grid,
                valid,
            )[0]
            for name in ("mf_foldin", "bias")
        }
        for name, scorer in fitted.items():
            arrays[f"{split}_{name}"] = _per_user_mae(
                scorer.predict_items(valid, valid.query_items), valid
            )
        g = torch.Generator().manual_seed(split)
        length = valid.merged()[0].shape[1]
        query = ds.manifest["protocol"]["query_size"]
        views = [valid] + [
            valid.resampled(query, torch.rand(valid.num_tasks, length, generator=g))
            for _ in range(resamples - 1)
        ]
        for name, scorer in fitted.items():
            arrays[f"{split}_{name}_resampled"] = np.mean(
                [_per_user_mae(scorer.predict_items(v, v.query_items), v) for v in views], 0
            )
        learner = build_learner(cfg, ds, train, valid, tuned_mf=fitted["mf_foldin"])
        shadow = build_learner(cfg, ds, train, valid, tuned_mf=fitted["mf_foldin"])

        def score(model, views=views) -> np.ndarray:  # (views, prior scales, users)
            return np.stack(
                [
                    [
                        _per_user_mae(
                            AdaptedScorer(model, prior_scale=c).predict_items(v, v.query_items), v
                        )
                        for c in PRIOR_SCALES
                    ]
                    for v in views
                ]
            )

        curves = {name: [score(learner)] for name in CURVES}
        optimizer, state, mean = loop.build_optimizer(learner, cfg), TrainState(), None
        for epoch in range(epochs):
            one_more = dataclasses.replace(
                cfg, train=dataclasses.replace(cfg.train, epochs=epoch + 1, patience=epochs + 1)
            )
            state = loop.run_epochs(
                one_more, learner, optimizer, loop.Shard.whole(train), valid, state
            )
            now = {k: v.detach().clone() for k, v in learner.state_dict().items()}
            mean = (
                now
                if mean is None
                else {
                    k: mean[k] + (v - mean[k]) / (epoch + 1) if v.is_floating_point() else v
                    for k, v in now.items()
                }
            )
            shadow.load_state_dict(mean)
            curves["trained"].append(score(learner))
            curves["averaged"].append(score(shadow))
        for name, curve in curves.items():
            stacked = np.stack(curve)  # (epochs + 1, views, scales, users)
            arrays[f"{split}_{name}"] = stacked[:, 0]
            arrays[f"{split}_{name}_resampled"] = stacked.mean(1)
        print(f"split {split}: done", file=sys.stderr, flush=True)
    np.savez(out, **arrays)


def _choose(curve: np.ndarray, patience: int | None) -> tuple[int, int]:
    """(epoch, scale) by the lowest mean MAE from epoch 1 on, stopping after ``patience``
    epochs without a better one (None: a fixed epoch count is not this rule)."""
    means = curve.mean(2)
    best, best_epoch = np.inf, 1
    for epoch in range(1, len(means)):
        if means[epoch].min() < best:
            best, best_epoch = means[epoch].min(), epoch
        elif patience is not None and epoch - best_epoch >= patience:
            break
    return best_epoch, int(means[best_epoch].argmin())


def compare(path: str, repeats: int = 20) -> dict:
    z = np.load(path)
    splits = sorted({k.split("_")[0] for k in z.files})
    resampled = f"{splits[0]}_trained_resampled" in z.files
    choose_on = ("", "_resampled") if resampled else ("",)
    rules = {
        f"{c}, patience {p}" + (", chosen on resampled queries" if on else ""): (c, p, on)
        for c in CURVES
        for p in (2, 3, 10, None)
        for on in choose_on
    }
    rules["untrained (prior scale only)"] = ("trained", 0, "")
    truth = "_resampled" if resampled else ""  # scored on the least noisy estimate there is
    diffs: dict[str, list[np.ndarray]] = {r: [] for r in rules}
    rng = np.random.default_rng(0)
    for _ in range(repeats):
        for s in splits:
            users = z[f"{s}_trained"].shape[2]
            perm = rng.permutation(users)
            pick, held = perm[: users // 2], perm[users // 2 :]
            mf = z[f"{s}_mf_foldin{truth}"][held]
            for rule, (curve_name, patience, on) in rules.items():
                curve = z[f"{s}_{curve_name}{on}"]
                if patience == 0:
                    epoch, scale = 0, int(curve[0][:, pick].mean(1).argmin())
                else:
                    epoch, scale = _choose(curve[:, :, pick], patience)
                diffs[rule].append(z[f"{s}_{curve_name}{truth}"][epoch, scale, held] - mf)
    return {
        "splits": splits,
        "validation_users": int(sum(z[f"{s}_trained"].shape[2] for s in splits)),
        "minus_mf_foldin": {r: round(float(np.concatenate(d).mean()), 4) for r, d in diffs.items()},
        "mean_valid_mae_by_epoch": {
            c: [
                round(float(v), 4)
                for v in np.stack([z[f"{s}_{c}"].mean(2).min(1) for s in splits]).mean(0)
            ]
            for c in CURVES
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--data", required=True)
    c.add_argument("--split-seeds", type=int, nargs="+", default=list(range(100, 110)))
    c.add_argument("--epochs", type=int, default=16)
    c.add_argument("--resamples", type=int, default=1, help="query re-splits per user (K)")
    c.add_argument("--try", dest="overrides", type=json.loads, default={})
    c.add_argument("--out", required=True)
    r = sub.add_parser("compare")
    r.add_argument("npz")
    args = p.parse_args()
    if args.command == "collect":
        collect(args.data, args.split_seeds, args.epochs, args.overrides, args.out, args.resamples)
    else:
        print(json.dumps(compare(args.npz)))


if __name__ == "__main__":
    main()
