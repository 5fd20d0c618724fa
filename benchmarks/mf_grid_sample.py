"""Does choosing MF fold-in's grid point on a sample of training users pick what the full
data picks? (``mf.MF_GRID_MAX_RATINGS``: above it, evaluation and training compare the grid
on a random subset of training users and fit only the chosen point on all of them.)

For each ``--caps`` value (``0``: no cap, every point fitted on every training user),
``mf.choose_mf`` picks a grid point on validation users; reported per cap: the chosen
point, the validation MAE of every point as compared, the chosen point's validation MAE
after its fit on every training user, and the seconds it took::

    .venv/bin/python benchmarks/mf_grid_sample.py --data work/scale/data-1000000 \
        --caps 0 400000 100000

The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="a prepared ratings dataset")
    ap.add_argument("--caps", type=int, nargs="+", default=[0, 2_000_000])
    ap.add_argument("--scenario", default="user_cold")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from metarec.batch import from_table, ragged_from_table
    from metarec.data.prepared import open_prepared
    from metarec.metrics import masked_mae
    from metarec.mf import choose_mf

    ds = open_prepared(args.data)
    train = ragged_from_table(ds.tasks(args.scenario, "train"))
    valid = from_table(ds.tasks(args.scenario, "valid"))
    n_items = ds.manifest["counts"]["items"]
    rows = []
    for cap in args.caps:
        start = time.perf_counter()
        chosen = choose_mf(
            train, valid, n_items, seed=args.seed, max_ratings=cap or len(train.ratings)
        )
        row = {
            "cap": cap or None,
            "sample_users": chosen.grid_sample_,
            "chosen": {"dim": chosen.dim, "reg": chosen.reg},
            "grid_valid_mae": chosen.grid_maes_,
            "chosen_valid_mae": masked_mae(chosen.predict(valid), valid),
            "seconds": time.perf_counter() - start,
        }
        rows.append(row)
        print(
            f"cap {cap or 'none'}: {row['chosen']} valid MAE {row['chosen_valid_mae']:.4f} "
            f"({row['sample_users']} users compared, {row['seconds']:.0f} s)",
            file=sys.stderr,
        )
    print(
        json.dumps(
            {
                "benchmark": "mf_grid_sample",
                "data": str(args.data),
                "train_users": train.num_tasks,
                "train_ratings": len(train.ratings),
                "valid_users": valid.num_tasks,
                "runs": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
