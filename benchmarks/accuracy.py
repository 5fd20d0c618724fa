"""Out-of-the-box accuracy: the default config against the classic baselines, everywhere.

Runs ``metarec evaluate``'s protocol (``metarec.evaluate.evaluate``) with the project's
defaults and no dataset YAML on ML-100k (``user_cold``, 5 user-split seeds) and on every
synthetic variant (``metarec.data.synthetic.VARIANTS``), and prints one JSON object: per
dataset, per method, MAE / RMSE / nDCG@3 (means over splits), and the paired difference of
the meta-learner against ``mf_foldin`` and against ``bias`` with its 95% bootstrap CI and
verdict (a win or loss only when the CI excludes 0). Every hyperparameter of every method,
the meta-learner's test-time prior scale included, is chosen on validation users.

    .venv/bin/python benchmarks/accuracy.py                      # everything (~1 h on 2 cores)
    .venv/bin/python benchmarks/accuracy.py --datasets ml100k    # one dataset
    .venv/bin/python benchmarks/accuracy.py --quick              # a tiny smoke run (~1 min)

Progress goes to stderr; the last line of stdout is the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from metarec.config import MetarecConfig, apply_overrides, load_config
from metarec.data.prepare import prepare
from metarec.data.prepared import PreparedDataset
from metarec.data.splits import resplit
from metarec.data.synthetic import VARIANTS, apply_variant
from metarec.evaluate import evaluate
from metarec.stats import verdict

ROOT = Path(__file__).resolve().parents[1]
ML100K = ROOT.parent / "shared" / "datasets" / "ml-100k"
METRICS = ("mae", "rmse", "ndcg@3")
CLASSIC = ("global_mean", "item_mean", "user_mean", "bias", "mf_foldin")
RIVALS = ("mf_foldin", "bias")


def dataset_config(name: str, ml100k: Path) -> MetarecConfig:
    """The defaults, pointed at one dataset: only the source changes, nothing is tuned."""
    cfg = load_config(None)
    if name == "ml100k":
        return apply_overrides(cfg, **{"data.source": "ml-100k", "data.input": str(ml100k)})
    return apply_variant(cfg, name.removeprefix("synthetic:"))


def summarize(rows: dict[str, Any], meta: str) -> dict[str, Any]:
    """Means per method and the meta-learner's paired comparisons with the rivals."""
    methods = {
        m: {k: round(float(v[k]), 4) for k in METRICS}
        for m, v in rows.items()
        if not m.startswith("_")
    }
    paired = rows["_paired"][meta]
    versus = {}
    for rival in RIVALS:
        versus[rival] = {
            k: {
                "diff": round(paired[rival][k]["diff"], 4),
                "ci95": [round(x, 4) for x in paired[rival][k]["ci95"]],
                "verdict": verdict(k, paired[rival][k]["diff"], paired[rival][k]["ci95"]),
            }
            for k in METRICS
        }
    protocol = rows["_protocol"]
    return {
        "methods": methods,
        "meta": meta,
        f"{meta}_vs": versus,
        "split_seeds": protocol["split_seeds"],
        "test_users": sum(protocol["test_users"]),
        "adapt": protocol["adapt"],
    }


def run(
    name: str,
    cfg: MetarecConfig,
    work: Path,
    split_seeds: list[int],
    baselines: tuple[str, ...],
) -> dict[str, Any]:
    t0 = time.perf_counter()
    ds: PreparedDataset = prepare(cfg, work / name.replace(":", "-"), progress=False)
    splits = [(s, resplit(ds, s)) for s in split_seeds]
    results = evaluate(
        cfg,
        ds,
        scenarios=["user_cold"],
        seeds=[cfg.seed],
        splits=splits,
        baselines=baselines,
        log=lambda msg: print(f"[{name}] {msg}", file=sys.stderr, flush=True),
    )
    out = summarize(results["user_cold"], cfg.meta.algorithm)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    names = ["ml100k", *(f"synthetic:{v}" for v in VARIANTS)]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=names, choices=names, metavar="NAME")
    ap.add_argument("--ml100k", type=Path, default=ML100K, help="MovieLens 100K directory")
    ap.add_argument("--split-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument(
        "--synthetic-split-seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="user splits of each synthetic variant (200 test users each)",
    )
    ap.add_argument(
        "--network-baselines",
        action="store_true",
        help="also train the global model and its fine-tuned version (doubles the time)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny data, 1 split, 2 epochs")
    ap.add_argument("--work", type=Path, default=None, help="where to prepare (default: temp)")
    args = ap.parse_args(argv)
    baselines = CLASSIC + (("global_model", "finetune") if args.network_baselines else ())
    report: dict[str, Any] = {"config": "defaults (no YAML)", "scenario": "user_cold"}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for name in args.datasets:
            cfg = dataset_config(name, args.ml100k)
            seeds = args.split_seeds if name == "ml100k" else args.synthetic_split_seeds
            if args.quick:
                cfg = apply_overrides(
                    cfg,
                    **{
                        "train.epochs": 2,
                        "data.synthetic.n_users": 300,
                        "data.synthetic.n_items": 200,
                    },
                )
                seeds = seeds[:1]
            print(f"[{name}] splits {seeds}", file=sys.stderr, flush=True)
            report[name] = run(name, cfg, work, seeds, baselines)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
