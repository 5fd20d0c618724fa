"""Benchmark ``metarec prepare``: wall time on ML-100k and on ~10M synthetic ratings, plus peak RSS.

Why it is built this way:

* **One fresh subprocess per measurement.** ``ru_maxrss`` is a high-water mark for the whole
  process, so measuring several runs in one interpreter would report the largest of them (or
  whatever the parent had already touched). Each measurement re-invokes this script in a hidden
  ``--child`` mode, which times only the ``prepare()`` call, reads its own
  ``getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux) and prints one JSON line back to the
  parent. Warm caches from an earlier run in the same process cannot flatter later runs either.
* **Bounded.** ML-100k is timed 3 times (median); the synthetic run happens once, because it
  is the expensive one. Every child has a wall-clock timeout (``--timeout``), outputs go to a
  temporary directory that is deleted after each run, and ``--smoke`` shrinks the work to a
  tiny synthetic dataset and a single ML-100k run (well under 30 s) for CI and quick checks.
* **Ratios, not just seconds.** Every figure is reported next to its target and as
  ``measured / target`` so results from noisy or slower machines can be compared in one run
  (a ratio above 1 misses the target).

Human-readable lines go to stderr; the LAST line of stdout is one JSON object (see
``benchmarks/README.md`` for its keys).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ML100K = REPO.parent / "shared" / "datasets" / "ml-100k"

ML100K_TARGET_S = 3.0
SYNTHETIC_TARGET_S = 90.0
RSS_TARGET_MB = 4096.0  # 4 GiB; "MB" here and in the JSON means MiB (ru_maxrss KiB / 1024)

# Full run: 180k users x 15..100 ratings each ~= 10.3M ratings.
FULL_USERS, SMOKE_USERS = 180_000, 20_000
N_ITEMS = 20_000
MIN_PER_USER, MAX_PER_USER = 15, 100


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Child side: does exactly one measured prepare() and reports it as JSON on stdout.
# --------------------------------------------------------------------------------------------


def run_child(kind: str, out: Path, ml100k: Path, n_users: int) -> dict[str, Any]:
    """Run one ``prepare()`` in this (fresh) process; return its timing and peak RSS."""
    from metarec.config import load_config
    from metarec.data.prepare import prepare

    if kind == "ml100k":
        cfg = load_config(None, **{"data.source": "ml-100k", "data.input": str(ml100k), "seed": 0})
    else:
        cfg = load_config(
            None,
            **{
                "data.source": "synthetic",
                "data.synthetic.n_users": n_users,
                "data.synthetic.n_items": N_ITEMS,
                "data.synthetic.min_ratings_per_user": MIN_PER_USER,
                "data.synthetic.max_ratings_per_user": MAX_PER_USER,
                "seed": 0,
            },
        )
    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    ds = prepare(cfg, out, progress=False)
    seconds = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "kind": kind,
        "seconds": seconds,
        "ratings": int(ds.manifest["counts"]["ratings_raw"]),
        "peak_rss_mb": peak_kib / 1024,
        "rss_before_prepare_mb": rss_before_kib / 1024,
    }


# --------------------------------------------------------------------------------------------
# Parent side: spawns one child per measurement and aggregates.
# --------------------------------------------------------------------------------------------


def measure(kind: str, tmp: Path, ml100k: Path, n_users: int, timeout: float) -> dict[str, Any]:
    """Run one measurement in a fresh subprocess; its output directory is removed afterwards."""
    out = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=tmp)) / "prepared"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        kind,
        "--out",
        str(out),
        "--ml100k",
        str(ml100k),
        "--n-users",
        str(n_users),
    ]
    try:
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise SystemExit(f"benchmark: {kind} run exceeded --timeout {timeout:g}s") from None
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise SystemExit(
            f"benchmark: {kind} child failed (exit {proc.returncode}); see its stderr above"
        )
    return json.loads(lines[-1])


def ratio(measured: float | None, target: float) -> float | None:
    return None if measured is None else round(measured / target, 3)


def machine() -> dict[str, Any]:
    try:
        nproc = len(os.sched_getaffinity(0))  # what `nproc` prints
    except AttributeError:  # not Linux
        nproc = os.cpu_count() or 0
    return {"nproc": nproc, "python": platform.python_version(), "platform": platform.platform()}


def verdict(r: float | None) -> str:
    return "skipped" if r is None else ("ok" if r <= 1.0 else "MISSED")


def run_parent(args: argparse.Namespace) -> dict[str, Any]:
    ml100k: Path = args.ml100k
    ml_runs = 1 if args.smoke else args.runs
    n_users = SMOKE_USERS if args.smoke else FULL_USERS
    result: dict[str, Any] = {}
    log(f"benchmark: {'smoke' if args.smoke else 'full'} run, python {sys.executable}")

    with tempfile.TemporaryDirectory(prefix="metarec-bench-") as tmp_name:
        tmp = Path(tmp_name)
        ml_s: float | None = None
        if (ml100k / "u.data").is_file():
            times = []
            for i in range(ml_runs):
                r = measure("ml100k", tmp, ml100k, n_users, args.timeout)
                times.append(r["seconds"])
                log(
                    f"  ml-100k run {i + 1}/{ml_runs}: {r['seconds']:.2f} s, "
                    f"{r['ratings']:,} ratings, peak RSS {r['peak_rss_mb']:.0f} MB"
                )
            ml_s = statistics.median(times)
        else:
            result["ml100k_skipped"] = f"{ml100k}/u.data not found (pass --ml100k PATH)"
            log(f"  ml-100k: skipped, {result['ml100k_skipped']}")

        log(f"  synthetic ({n_users:,} users x {MIN_PER_USER}..{MAX_PER_USER} ratings): running")
        syn = measure("synthetic", tmp, ml100k, n_users, args.timeout)
        log(
            f"  synthetic: {syn['seconds']:.2f} s, {syn['ratings']:,} ratings, peak RSS "
            f"{syn['peak_rss_mb']:.0f} MB ({syn['rss_before_prepare_mb']:.0f} MB after imports)"
        )

    result = {
        "ml100k_prepare_s": None if ml_s is None else round(ml_s, 3),
        "ml100k_target_s": ML100K_TARGET_S,
        "ml100k_ratio": ratio(ml_s, ML100K_TARGET_S),
        "synthetic_ratings": syn["ratings"],
        "synthetic_prepare_s": round(syn["seconds"], 3),
        "synthetic_target_s": SYNTHETIC_TARGET_S,
        "synthetic_ratio": ratio(syn["seconds"], SYNTHETIC_TARGET_S),
        "synthetic_peak_rss_mb": round(syn["peak_rss_mb"], 1),
        "rss_target_mb": RSS_TARGET_MB,
        "rss_ratio": ratio(syn["peak_rss_mb"], RSS_TARGET_MB),
        "smoke": bool(args.smoke),
        "machine": machine(),
        **result,
    }
    rows = [
        (
            "ml-100k prepare (s)",
            result["ml100k_prepare_s"],
            ML100K_TARGET_S,
            result["ml100k_ratio"],
        ),
        (
            "synthetic prepare (s)",
            result["synthetic_prepare_s"],
            SYNTHETIC_TARGET_S,
            result["synthetic_ratio"],
        ),
        (
            "synthetic peak RSS (MB)",
            result["synthetic_peak_rss_mb"],
            RSS_TARGET_MB,
            result["rss_ratio"],
        ),
    ]
    log(f"\n{'metric':<24} {'measured':>10} {'target':>10} {'ratio':>7}  verdict")
    for name, value, target, r in rows:
        shown = "-" if value is None else f"{value:.2f}"
        log(
            f"{name:<24} {shown:>10} {target:>10.1f} {'-' if r is None else f'{r:.3f}':>7}"
            f"  {verdict(r)}"
        )
    if args.smoke:
        log("(smoke run: the synthetic figures are for a tiny dataset, not the 10M target)")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time `metarec prepare` on ML-100k (median of --runs) and on ~10M "
        "synthetic ratings (wall time + peak RSS), each in a fresh subprocess, "
        "and compare with the targets. Human lines go to stderr; the last line "
        "of stdout is one JSON object."
    )
    p.add_argument(
        "--ml100k",
        type=Path,
        default=DEFAULT_ML100K,
        help="directory with the MovieLens-100k files (u.data, u.item, ...); "
        "skipped if absent (default: %(default)s)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help=f"quick check: {SMOKE_USERS:,}-user synthetic data instead of "
        f"{FULL_USERS:,} users, and one ML-100k run",
    )
    p.add_argument(
        "--runs",
        type=int,
        default=3,
        help="ML-100k runs to take the median of (default: %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="wall-clock limit per measured subprocess, seconds (default: %(default)s)",
    )
    # Hidden: the per-measurement subprocess mode.
    p.add_argument("--child", choices=["ml100k", "synthetic"], help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--n-users", type=int, default=FULL_USERS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if args.child and args.out is None:
        p.error("--child needs --out")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child, args.out, args.ml100k, args.n_users)))
        return 0
    print(json.dumps(run_parent(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
