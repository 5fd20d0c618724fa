"""How each cost grows with the data: prepare, train, evaluate and serve, side by side.

Each size is ``configs/ml25m.yaml`` (a synthetic MovieLens-25M: long-tailed activity, users
up to 8,000 ratings, 60,000 films) with its user count scaled to the wanted interactions,
so every size has the same shape and only the number of users grows. Every stage is the
CLI a user runs, in its own process group, measured from outside:

* ``prepare``: seconds, peak RSS;
* ``train`` (``--epochs 1 --workers 2``): seconds end to end, the epoch's seconds and
  tasks/s (from the run's history), bytes all-reduced per meta-batch, peak RSS of the
  driver and of each Ray Train worker (every process under the driver, sampled from /proc);
* ``evaluate --model`` of the trained checkpoint, one seed, test users scored by
  ``--evaluate-workers`` Ray Data actors (0: in the evaluating process): seconds, peak RSS
  of the driver and of each scoring actor;
* ``serve``: ``benchmarks/serve_load.py`` (real HTTP, 8 concurrent ``/v1/recommend`` with
  20 events) over synthetic shops of ``--serve-items`` items: p50 and p99 ms.

The JSON (last line of stdout) has one row per size and per catalogue, and for each cost
its growth exponent between the smallest and the largest size (cost ~ size^b: b = 1 is
linear, b = 0 flat); ``--png`` draws cost against size on log axes. A stage that fails or
passes ``--timeout`` is reported as such (``"error"``), and the run goes on.

    .venv/bin/python benchmarks/scale.py --work work/scale --png docs/scale.png
    .venv/bin/python benchmarks/scale.py --smoke     # tiny sizes, under 2 minutes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BASE = REPO / "configs" / "ml25m.yaml"
BASE_USERS, BASE_RATINGS = 160_000, 25_094_612  # configs/ml25m.yaml as prepared
SMOKE_SETS = ("data.synthetic.n_items=2000", "data.synthetic.max_ratings_per_user=400")


def _rss_kb(pid: int) -> tuple[int, int]:
    """(resident, private) KiB: VmRSS counts the pages of Ray's shared object store a
    process has read; RssAnon is its own memory alone."""
    found = {"VmRSS:": 0, "RssAnon:": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0] + ":"
            if key in found:
                found[key] = int(line.split()[1])
    except OSError:
        pass
    return found["VmRSS:"], found["RssAnon:"]


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(entry.name))
    return out


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


WORKER_TITLES = ("RayTrainWorker", "MapWorker")  # Ray's process titles of Train and Data workers


def run_measured(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None) -> dict:
    """Run ``cmd``; its seconds, exit code, output, and peak RSS (MiB) of it and of each Ray
    worker under it (a Train worker, a Ray Data actor), sampled every 0.2 s (the kernel's
    ru_maxrss cannot tell the workers, which are grandchildren, apart)."""
    out = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (read back after the run)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    peak: dict[int, int] = {}
    private: dict[int, int] = {}
    workers: set[int] = set()
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            tree, frontier = _children(), [(proc.pid, False)]
            while frontier:
                pid, in_worker = frontier.pop()
                rss, anon = _rss_kb(pid)
                peak[pid] = max(peak.get(pid, 0), rss)
                private[pid] = max(private.get(pid, 0), anon)
                # a worker's own fork (a subprocess before its exec) carries the worker's
                # title for a moment: it is not another worker
                titled = not in_worker and pid not in workers
                if titled and any(w in _cmdline(pid) for w in WORKER_TITLES):
                    workers.add(pid)
                in_worker = in_worker or pid in workers
                frontier.extend((child, in_worker) for child in tree.get(pid, []))
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = "timeout"
    done.set()
    sampler.join()
    out.seek(0)
    text = out.read()
    return {
        "s": round(time.perf_counter() - start, 1),
        "code": code,
        "output": text,
        "peak_rss_mb": round(peak.get(proc.pid, 0) / 1024),
        "worker_peak_rss_mb": [round(peak[p] / 1024) for p in sorted(workers)],
        "worker_peak_private_mb": [round(private[p] / 1024) for p in sorted(workers)],
    }


def _stage(name: str, res: dict, log: Path | None = None, **extra: Any) -> dict:
    """A stage's row (and its output kept in ``log``, for what the figures hide)."""
    if log is not None:
        log.write_text(res["output"])
    row = {k: res[k] for k in ("s", "peak_rss_mb")} | extra
    if res["code"] != 0:
        row["error"] = f"exit {res['code']}: " + res["output"][-600:]
        print(f"  {name}: FAILED ({res['code']})\n{res['output'][-2000:]}", file=sys.stderr)
    else:
        print(f"  {name}: {json.dumps(row)}", file=sys.stderr)
    return row


def users_for(interactions: float) -> int:
    """The user count that gives ``configs/ml25m.yaml``'s shape about ``interactions``."""
    return max(64, round(BASE_USERS * interactions / BASE_RATINGS))


def one_size(
    interactions: int,
    work: Path,
    extra_sets: tuple[str, ...],
    timeout: float,
    evaluate: bool = True,
    evaluate_workers: int = 2,
) -> dict[str, Any]:
    """prepare -> train (1 epoch, 2 workers) -> evaluate --model, at one size."""
    users = users_for(interactions)
    data, run = work / f"data-{interactions}", work / f"run-{interactions}"
    sets = [a for s in (f"data.synthetic.n_users={users}", *extra_sets) for a in ("--set", s)]
    metarec = [str(BIN / "metarec")]
    row: dict[str, Any] = {"target_interactions": interactions, "users": users}
    res = run_measured(
        [*metarec, "prepare", "--config", str(BASE), *sets, "--out", str(data)], timeout=timeout
    )
    row["prepare"] = _stage("prepare", res, work / f"prepare-{interactions}.log")
    if res["code"] != 0:
        return row
    manifest = json.loads((data / "manifest.json").read_text())
    row["interactions"] = manifest["counts"]["ratings_kept"]
    res = run_measured(
        [
            *metarec,
            *("train", "--data", str(data), "--epochs", "1", "--workers", "2"),
            *("--work-dir", str(run), "--set", "meta.prior_precision=10"),
        ],
        timeout=timeout,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},  # its own local Ray
    )
    checkpoints = sorted(run.glob("checkpoints/*/checkpoint.pt"))
    epoch: dict[str, Any] = {}
    if res["code"] == 0 and checkpoints:
        from metarec.checkpoint import load_checkpoint

        last = load_checkpoint(checkpoints[-1])["state"]["history"][-1]
        epoch = {
            "epoch_s": round(last["train/epoch_s"], 3),  # a smoke epoch is under 0.05 s
            "tasks_per_s": round(last["train/tasks_per_s"], 1),
            "tasks": int(last["train/tasks"]),
            "allreduce_bytes_per_step": int(last["train/allreduce_bytes"]),
        }
    row["train"] = _stage(
        "train",
        res,
        work / f"train-{interactions}.log",
        **epoch,
        worker_peak_rss_mb=max(res["worker_peak_rss_mb"], default=None),
        worker_peak_private_mb=max(res["worker_peak_private_mb"], default=None),
        workers_seen=len(res["worker_peak_rss_mb"]),
    )
    if not epoch:
        return row
    if not evaluate:
        row["evaluate"] = {"skipped": "above --evaluate-up-to"}
        return row
    res = run_measured(
        [
            *metarec,
            *("evaluate", "--data", str(data), "--model", str(checkpoints[-1])),
            *("--seeds", "0", "--work-dir", str(run), "--out", str(run / "eval")),
            *("--workers", str(evaluate_workers)),
        ],
        timeout=timeout,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    row["evaluate"] = _stage(
        "evaluate",
        res,
        work / f"evaluate-{interactions}.log",
        workers=evaluate_workers,
        worker_peak_rss_mb=max(res["worker_peak_rss_mb"], default=None),
        workers_seen=len(res["worker_peak_rss_mb"]),
    )
    return row


def serve_at(items: int, work: Path, timeout: float, smoke: bool) -> dict[str, Any]:
    """p50/p99 of 8 concurrent /v1/recommend over a synthetic shop of ``items`` items."""
    shop = REPO / "configs" / "shop.yaml"
    data = work / f"shop-{items}"
    row: dict[str, Any] = {"items": items}
    if not (data / "manifest.json").is_file():
        users = 300 if smoke else 2000
        sets = (f"synthetic.n_users={users}", f"synthetic.n_items={items}", "scenarios=user_cold")
        args = [a for s in sets for a in ("--set", f"data.{s}")]
        res = run_measured(
            [str(BIN / "metarec"), "prepare", "--config", str(shop), *args, "--out", str(data)],
            timeout=timeout,
        )
        if res["code"] != 0:
            return row | {"error": _stage("prepare", res)["error"]}
    load = [str(BIN / "python"), str(REPO / "benchmarks" / "serve_load.py")]
    load += ["--data", str(data), "--config", str(shop), "--modes", "on", "--concurrency", "8"]
    if smoke:
        load += ["--requests", "32", "--budget-s", "5"]
    res = run_measured(load, timeout=timeout)
    if res["code"] != 0:
        return row | {"error": _stage("serve", res)["error"]}
    results = json.loads(res["output"].strip().splitlines()[-1])["results"]
    on, floor = results["on_c8"], results["healthz_c8"]  # floor: the HTTP stack, no work
    row |= {k: round(on[k], 1) for k in ("p50_ms", "p99_ms", "rps")}
    row["healthz_p99_ms"] = round(floor["p99_ms"], 1)
    print(f"  serve {items:,} items: {json.dumps(row)}", file=sys.stderr)
    return row


COSTS = {  # name -> where in a size's row
    "prepare_s": ("prepare", "s"),
    "prepare_rss_mb": ("prepare", "peak_rss_mb"),
    "train_s": ("train", "s"),
    "epoch_s": ("train", "epoch_s"),
    "tasks_per_s": ("train", "tasks_per_s"),
    "worker_rss_mb": ("train", "worker_peak_rss_mb"),
    "worker_private_mb": ("train", "worker_peak_private_mb"),
    "driver_rss_mb": ("train", "peak_rss_mb"),
    "allreduce_bytes_per_step": ("train", "allreduce_bytes_per_step"),
    "evaluate_s": ("evaluate", "s"),
    "evaluate_rss_mb": ("evaluate", "peak_rss_mb"),
}


def _points(rows: list[dict[str, Any]], stage: str, key: str) -> list[tuple[int, float]]:
    """(interactions, cost) of the sizes where ``stage`` ran and measured ``key``."""
    out = []
    for r in rows:
        value = r.get(stage, {}).get(key)
        if isinstance(value, (int, float)) and value > 0 and "error" not in r[stage]:
            out.append((r["interactions"], value))
    return out


def growth(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Each cost's exponent b in cost ~ interactions^b, from the smallest to the largest
    size where both have it (1: linear in the data; 0: flat)."""
    out: dict[str, float | None] = {}
    for name, (stage, key) in COSTS.items():
        points = _points(rows, stage, key)
        if len(points) < 2 or points[0][0] == points[-1][0]:
            out[name] = None
            continue
        (n0, c0), (n1, c1) = points[0], points[-1]
        out[name] = round(math.log(c1 / c0) / math.log(n1 / n0), 2)
    return out


def draw(rows: list[dict[str, Any]], path: Path) -> None:
    """Cost against interactions, log-log: time, memory and throughput panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {
        "seconds": ("prepare_s", "train_s", "epoch_s", "evaluate_s"),
        "peak RSS (MiB)": (
            "prepare_rss_mb",
            "driver_rss_mb",
            "worker_rss_mb",
            "worker_private_mb",
            "evaluate_rss_mb",
        ),
        "training tasks/s": ("tasks_per_s",),
    }
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), layout="constrained")
    for ax, (label, names) in zip(axes, panels.items(), strict=True):
        for name in names:
            pts = _points(rows, *COSTS[name])
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        linear = _points(rows, *COSTS[names[0]])
        if label == "seconds" and len(linear) > 1:  # slope 1 through the first point
            (n0, c0), n1 = linear[0], linear[-1][0]
            ax.plot([n0, n1], [c0, c0 * n1 / n0], "k:", label="linear in interactions")
        ax.set(xscale="log", xlabel="interactions", ylabel=label)
        if label == "training tasks/s":
            ax.set_ylim(bottom=0)  # a rate: flat is the goal, read it on a linear axis
        else:
            ax.set_yscale("log")
        ax.legend(fontsize="small")
    fig.suptitle("metarec: cost against data size (benchmarks/scale.py)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_from(files: list[Path], png: Path | None) -> dict[str, Any]:
    """Rows of several runs (e.g. the largest size measured on its own), merged by size
    and stage, drawn, and printed with their growth exponents."""
    if png is None:
        sys.exit("--plot-from: expected --png too")
    merged: dict[int, dict[str, Any]] = {}
    for f in files:
        for row in json.loads(f.read_text().strip().splitlines()[-1])["sizes"]:
            keep = {k: v for k, v in row.items() if not (isinstance(v, dict) and "skipped" in v)}
            merged.setdefault(row["target_interactions"], {}).update(keep)
    rows = [merged[k] for k in sorted(merged)]
    draw(rows, png)
    result = {"benchmark": "scale", "sizes": rows, "growth_exponent": growth(rows)}
    result |= {"png": str(png), "from": [str(f) for f in files]}
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e6, 5e6, 25e6])
    ap.add_argument("--serve-items", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--work", type=Path, help="where data and runs go (default: a temp dir)")
    ap.add_argument("--png", type=Path, help="write the cost-vs-size plot here")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per stage")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and shops: the CI check")
    ap.add_argument(
        "--evaluate-up-to", type=float, help="skip evaluate above this many interactions"
    )
    ap.add_argument(
        "--evaluate-workers",
        type=int,
        default=2,
        help="Ray Data actors scoring test users (evaluate --workers; 0: in process)",
    )
    ap.add_argument(
        "--plot-from",
        type=Path,
        nargs="+",
        help="only draw --png from these runs' JSON (a size in a later file replaces it)",
    )
    args = ap.parse_args(argv)
    if args.plot_from:
        return _plot_from(args.plot_from, args.png)
    sets: tuple[str, ...] = ()
    if args.smoke:
        args.sizes, args.serve_items, sets = [8e3, 24e3], [2000], SMOKE_SETS
    with tempfile.TemporaryDirectory(prefix="metarec-scale-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        for size in args.sizes:
            print(f"{int(size):,} interactions", file=sys.stderr)
            evaluate = args.evaluate_up_to is None or size <= args.evaluate_up_to
            rows.append(
                one_size(int(size), work, sets, args.timeout, evaluate, args.evaluate_workers)
            )
        serve = [serve_at(i, work, args.timeout, args.smoke) for i in args.serve_items]
    result = {
        "benchmark": "scale",
        "smoke": args.smoke,
        "sizes": rows,
        "growth_exponent": growth(rows),
        "serve_c8": serve,
        "cpus": os.cpu_count(),
    }
    if args.png:
        draw(rows, args.png)
        result["png"] = str(args.png)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
