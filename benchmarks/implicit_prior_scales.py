"""Validation-only sweep: the implicit meta-learner's NDCG@10 by test-time prior scale.

Meta-trains the defaults (plus ``--set`` overrides) on ``--data`` (an implicit dataset),
cuts the validation users to ``--max-support`` interactions, and scores the adapted
full-catalogue ranking at each scale c of the ridge head's learned prior precision
(c = 10000: the per-user fit all but off, every weight at its meta-learned prior mean).
Test users are never scored. What chose the implicit defaults (docs/defaults-log.md §9).
Prints one JSON object.

    .venv/bin/python benchmarks/implicit_prior_scales.py --data work/shop-small \
        --set model.neighbours=0
"""

from __future__ import annotations

import argparse
import json
import time

from metarec.batch import from_table
from metarec.config import load_config, parse_overrides
from metarec.data.prepared import open_prepared
from metarec.implicit_metrics import valid_ndcg
from metarec.loop import fit
from metarec.scorers import AdaptedScorer

SCALES = (1.0, 2.0, 4.0, 16.0, 64.0, 1e4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--scenario", default="user_cold")
    ap.add_argument("--max-support", type=int, default=10)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    ds = open_prepared(args.data)
    n = ds.manifest["counts"]["items"]
    valid = from_table(ds.tasks(args.scenario, "valid")).cut_support(args.max_support)
    overrides = parse_overrides(args.set)
    cfg = load_config(None, **{"train.scenario": args.scenario, **overrides})
    start = time.perf_counter()
    learner = fit(cfg, ds).learner
    seconds = time.perf_counter() - start
    ndcg = {
        str(c): round(valid_ndcg(AdaptedScorer(learner, prior_scale=c), valid, n), 4)
        for c in SCALES
    }
    print(
        json.dumps(
            {"valid_ndcg@10_by_prior_scale": ndcg, "fit_seconds": round(seconds), **vars(args)}
        )
    )


if __name__ == "__main__":
    main()
