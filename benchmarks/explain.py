"""Are ``explain: true``'s reasons faithful? Remove them and see.

For real test users (their first ``--ratings`` support ratings, as ``serve_load.py`` sends
them), ``/v1/recommend`` with ``explain: true`` is answered in process (the served
``Service`` and ``Engine``, no HTTP). For each of the top ``--k`` items, two separate
``/v1/predict``-style requests score that item again: one without the support item the
explanation ranks first, one without a support item drawn at random. Faithful reasons make
the first drop larger. Reported: both mean drops (per user, averaged over their items), the
paired difference with its 95% bootstrap CI over users (``metarec.stats``), how often the
top reason's drop beats the random one, and the largest gap between a stated contribution
and the drop measured by the separate request (the explanation is leave-one-out, so this
checks the serving path, not an approximation).

    .venv/bin/python benchmarks/explain.py --data work/demo-data --model models:/NAME@champion

The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from serve_load import request_bodies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="prepared data (its test users)")
    ap.add_argument("--model", required=True, help="checkpoint or models:/ URI")
    ap.add_argument("--ratings", type=int, default=20, help="support ratings per request")
    ap.add_argument("--k", type=int, default=10, help="recommended items checked per user")
    ap.add_argument("--users", type=int, default=256, help="at most this many test users")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from metarec.config import ServeConfig
    from metarec.serving.app import load_service
    from metarec.serving.schemas import PredictRequest, RecommendRequest
    from metarec.stats import paired_differences

    work = tempfile.mkdtemp(prefix="explain-")
    service = load_service(ServeConfig(model=args.model, work_dir=work), writer="bench")
    field = "events" if service.catalog.feedback == "implicit" else "ratings"
    rng = random.Random(args.seed)
    top_drops, random_drops, wins, gap, reasons_per_item = [], [], [], 0.0, []
    for body in request_bodies(args.data, args.ratings, limit=args.users):
        req = RecommendRequest(**{**body, "k": args.k, "explain": True})
        job = service.recommend_job(req)
        (result,) = service.engine.run([job])
        answer = service.recommend_response(req, job, result)["items"]
        support = body[field]
        asks, pairs = [], []
        for entry in answer:
            row = int((result.explained == service.catalog.index[entry["item"]]).nonzero()[0, 0])
            influence = result.influence[row]
            top, other = int(influence.argmax()), rng.randrange(len(support))
            for s in (top, other):
                fewer = {**body, field: support[:s] + support[s + 1 :], "items": [entry["item"]]}
                fewer.pop("k")
                asks.append(service.predict_job(PredictRequest(**fewer)))
            pairs.append((entry["score"], float(influence[top])))
            reasons_per_item.append(len(entry["because"]))
        scores = [float(r.scores[0]) for r in service.engine.run(asks)]
        drops = [
            (full - scores[2 * n], full - scores[2 * n + 1], stated)
            for n, (full, stated) in enumerate(pairs)
        ]
        gap = max([gap, *(abs(d - stated) for d, _, stated in drops)])
        top_drops.append(float(np.mean([d for d, _, _ in drops])))
        random_drops.append(float(np.mean([r for _, r, _ in drops])))
        wins.append(float(np.mean([d > r for d, r, _ in drops])))
    top, rand = np.array(top_drops), np.array(random_drops)
    ci = paired_differences([{"drop": top}], [{"drop": rand}], ["drop"], seed=args.seed)["drop"]
    summary = {
        "benchmark": "explain",
        "model": service.model_info["label"],
        "dataset": service.catalog.dataset.get("source"),
        "catalog_items": len(service.catalog),
        "users": len(top),
        "ratings_per_request": args.ratings,
        "k": args.k,
        "mean_drop_top_reason": float(top.mean()),
        "mean_drop_random_support": float(rand.mean()),
        "difference": ci["diff"],
        "difference_ci95": ci["ci95"],
        "share_items_top_beats_random": float(np.mean(wins)),
        "mean_reasons_per_item": float(np.mean(reasons_per_item)),
        "max_abs_stated_minus_measured": gap,
    }
    print(
        f"drop without the top reason {top.mean():.4f}, without a random rating "
        f"{rand.mean():.4f} (difference CI {ci['ci95']})",
        file=sys.stderr,
    )
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
