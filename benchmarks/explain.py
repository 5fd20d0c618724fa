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
import sys
from pathlib import Path
from typing import Any

import numpy as np

from serve_load import in_process_service, request_bodies


def user_drops(service: Any, body: dict, k: int, rng: random.Random) -> list[tuple]:
    """One user's top ``k``, explained; per item (score drop without the top reason, drop
    without a random rating, the stated contribution, reasons named), each drop measured
    by a separate request without that rating."""
    from metarec.serving.schemas import PredictRequest, RecommendRequest

    field = "events" if service.catalog.feedback == "implicit" else "ratings"
    req = RecommendRequest(**{**body, "k": k, "explain": True})
    job = service.recommend_job(req)
    (result,) = service.engine.run([job])
    answer = service.recommend_response(req, job, result)["items"]
    support = body[field]
    asks, stated = [], []
    for entry in answer:
        row = int((result.explained == service.catalog.index[entry["item"]]).nonzero()[0, 0])
        influence = result.influence[row]
        top = int(influence.argmax())
        for s in (top, rng.randrange(len(support))):
            fewer = {**body, field: support[:s] + support[s + 1 :], "items": [entry["item"]]}
            fewer.pop("k")
            asks.append(service.predict_job(PredictRequest(**fewer)))
        stated.append((entry["score"], float(influence[top]), len(entry["because"])))
    scores = [float(r.scores[0]) for r in service.engine.run(asks)]
    return [
        (full - scores[2 * n], full - scores[2 * n + 1], contribution, reasons)
        for n, (full, contribution, reasons) in enumerate(stated)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="prepared data (its test users)")
    ap.add_argument("--model", required=True, help="checkpoint or models:/ URI")
    ap.add_argument("--ratings", type=int, default=20, help="support ratings per request")
    ap.add_argument("--k", type=int, default=10, help="recommended items checked per user")
    ap.add_argument("--users", type=int, default=256, help="at most this many test users")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from metarec.stats import paired_differences

    rng = random.Random(args.seed)
    bodies = request_bodies(args.data, args.ratings, limit=args.users)
    with in_process_service(args.model) as service:
        users = [user_drops(service, body, args.k, rng) for body in bodies]
        info = {
            "model": service.model_info["label"],
            "dataset": service.catalog.dataset.get("source"),
            "catalog_items": len(service.catalog),
        }
    top = np.array([np.mean([d[0] for d in u]) for u in users])
    rand = np.array([np.mean([d[1] for d in u]) for u in users])
    items = [d for u in users for d in u]
    ci = paired_differences([{"drop": top}], [{"drop": rand}], ["drop"], seed=args.seed)["drop"]
    summary = {
        "benchmark": "explain",
        **info,
        "users": len(top),
        "ratings_per_request": args.ratings,
        "k": args.k,
        "mean_drop_top_reason": float(top.mean()),
        "mean_drop_random_support": float(rand.mean()),
        "difference": ci["diff"],
        "difference_ci95": ci["ci95"],
        "share_items_top_beats_random": float(
            np.mean([np.mean([d[0] > d[1] for d in u]) for u in users])
        ),
        "mean_reasons_per_item": float(np.mean([d[3] for d in items])),
        "max_abs_stated_minus_measured": max(abs(d[0] - d[2]) for d in items),
    }
    print(
        f"drop without the top reason {top.mean():.4f}, without a random rating "
        f"{rand.mean():.4f} (difference CI {ci['ci95']})",
        file=sys.stderr,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
