"""Two Ray Train workers against one process: the same training loop on the same data.

Issue 18's target is that two workers on a 2-core machine reach at least 80% of one
process's meta-training throughput. This script measures both sides in one run, on the same
prepared tasks, config and initial weights (``train.initial_checkpoint``), with the same
code (``loop.train_epoch``):

* ``one_process``: a fresh Python process without Ray, torch's default thread count (all
  cores), then pinned to one thread (what each Ray worker gets on 2 cores);
* ``two_workers``: ``metarec train --workers 2`` on its own local Ray (one thread each).

Throughput is tasks per second of the training pass alone (``train/pass_s``), of the last of
``--epochs`` epochs (the first pays for warm-up); the epoch's other costs (validation,
checkpoint and report, Ray's start-up) are reported beside it, and so is the time the
workers spent inside the all-reduce (``sync_s``: the transfer plus waiting for the slower
worker). ``ratio`` = two workers / one process at its default threads.

Why not ``meta_step.py``'s figure: it times one meta-batch of MeLU-sized synthetic tasks,
whose shapes (supports of 3-90, no support window) are not the training data's; its figure
is printed beside for reference only, from the same run.

    .venv/bin/python benchmarks/train_throughput.py --interactions 1e6 --work work/throughput
    .venv/bin/python benchmarks/train_throughput.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from scale import BASE, BIN, REPO, SMOKE_SETS, users_for

SETS = ("meta.prior_precision=10",)  # as scale.py trains: no MF grid in the initial fit


def one_process(data: Path, epochs: int, threads: int | None, sets: list[str]) -> dict[str, Any]:
    """``train_epoch`` ``epochs`` times in this process (no Ray): the reference side."""
    import torch

    from metarec.batch import ragged_from_table
    from metarec.checkpoint import learner_from_checkpoint
    from metarec.config import load_config
    from metarec.data.prepared import open_prepared
    from metarec.loop import Shard, build_optimizer, train_epoch
    from metarec.train import initial_checkpoint

    if threads is not None:
        torch.set_num_threads(threads)
    cfg = load_config(None, overrides=[*SETS, *sets])
    ds = open_prepared(data)
    learner = learner_from_checkpoint(initial_checkpoint(cfg, ds), best=False).train()
    optimizer = build_optimizer(learner, cfg)
    shard = Shard.whole(ragged_from_table(ds.tasks(cfg.train.scenario, "train")))
    generator = torch.Generator().manual_seed(cfg.seed)
    passes = [train_epoch(learner, optimizer, shard, generator) for _ in range(epochs)]
    last = passes[-1]
    return {
        "threads": torch.get_num_threads(),
        "tasks": int(last.seen.sum()),
        "pass_s": round(last.seconds, 3),
        "tasks_per_s": round(float(last.seen.sum()) / last.seconds, 1),
        "first_pass_s": round(passes[0].seconds, 2),
    }


def _python(*args: str, timeout: float) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    if out.returncode != 0:
        raise RuntimeError(f"{args}: exit {out.returncode}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def two_workers(data: Path, run: Path, epochs: int, sets: list[str], timeout: float) -> dict:
    """``metarec train --workers 2`` on its own local Ray; the last epoch's history row."""
    from metarec.checkpoint import load_checkpoint

    over = [a for s in (*SETS, *sets) for a in ("--set", s)]
    cmd = [str(BIN / "metarec"), "train", "--data", str(data), "--epochs", str(epochs)]
    started = time.perf_counter()
    out = subprocess.run(
        [*cmd, "--workers", "2", "--work-dir", str(run), "--set", "train.patience=100", *over],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},  # its own local Ray
    )
    if out.returncode != 0:
        raise RuntimeError(f"metarec train: exit {out.returncode}\n{out.stderr[-3000:]}")
    wall = time.perf_counter() - started
    last = load_checkpoint(sorted(run.glob("checkpoints/*/checkpoint.pt"))[-1])["state"]
    row = last["history"][-1]
    return {
        "threads": 1,
        "tasks": int(row["train/tasks"]),
        "pass_s": round(row["train/pass_s"], 3),
        "tasks_per_s": round(row["train/pass_tasks_per_s"], 1),
        "sync_s": round(row["train/sync_s"], 3),
        "allreduce_bytes_per_step": round(row["train/allreduce_bytes"]),
        "allreduce_bytes_dense": round(row["train/allreduce_bytes_dense"]),
        "valid_s": round(row["train/valid_s"], 2),
        "epoch_s": round(row["train/epoch_s"], 2),
        "epoch_tasks_per_s": round(row["train/tasks_per_s"], 1),
        "wall_s": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--interactions", type=float, default=1e6, help="synthetic size to prepare")
    p.add_argument("--data", type=Path, help="a prepared dataset instead of preparing one")
    p.add_argument("--work", type=Path, default=REPO / "work" / "throughput")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--set", action="append", default=[], dest="sets", help="config override")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--smoke", action="store_true", help="a tiny size, for the test suite")
    p.add_argument("--one-process", type=Path, help=argparse.SUPPRESS)  # the child's side
    p.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one_process is not None:
        res = one_process(args.one_process, args.epochs, args.threads, args.sets)
        print(json.dumps(res))
        return res
    work, data = args.work, args.data
    if args.smoke:
        args.interactions, args.epochs = 2e4, 2
        args.sets = [*args.sets, "train.eval_batch_size=64"]
    if data is None:
        data = work / f"data-{int(args.interactions)}"
        if not (data / "manifest.json").exists():
            sets = [f"data.synthetic.n_users={users_for(args.interactions)}"]
            sets += list(SMOKE_SETS) if args.smoke else []
            subprocess.run(
                [str(BIN / "metarec"), "prepare", "--config", str(BASE), "--out", str(data)]
                + [a for s in sets for a in ("--set", s)],
                check=True,
                capture_output=True,
                timeout=args.timeout,
            )
    script, common = str(Path(__file__).resolve()), ["--epochs", str(args.epochs)]
    common += [a for s in args.sets for a in ("--set", s)]
    sides = {
        "one_process": _python(script, "--one-process", str(data), *common, timeout=args.timeout),
        "one_process_1_thread": _python(
            script, "--one-process", str(data), "--threads", "1", *common, timeout=args.timeout
        ),
        "two_workers": two_workers(data, work / "run", args.epochs, args.sets, args.timeout),
    }
    reps = [] if args.smoke else ["--reps", "5"]
    meta_step = _python(
        str(REPO / "benchmarks" / "meta_step.py"), "--smoke", *reps, timeout=args.timeout
    )["results"][0]
    one, two = sides["one_process"], sides["two_workers"]
    out = {
        **sides,
        "ratio": round(two["tasks_per_s"] / one["tasks_per_s"], 3),
        "ratio_vs_1_thread": round(
            two["tasks_per_s"] / sides["one_process_1_thread"]["tasks_per_s"], 3
        ),
        "sync_share": round(two["sync_s"] / two["pass_s"], 3),
        "meta_step_tasks_per_s": meta_step["tasks_per_s_vectorized"],
        "data": str(data),
        "epochs": args.epochs,
        "sets": [*SETS, *args.sets],
        "loadavg": [round(x, 2) for x in os.getloadavg()[:2]],
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
